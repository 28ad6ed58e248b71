"""The strategies' math against hand-computed values, the registry, and state round trips."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from mtl.config import (
    GRADIENT_NAMES,
    WEIGHTING_NAMES,
    DWAWeighting,
    FAMOWeighting,
    GradientConfig,
    GradNormWeighting,
    RLWWeighting,
    StaticWeighting,
    SumWeighting,
    UncertaintyWeighting,
    load_config,
)
from mtl.strategies import (
    DWA,
    FAMO,
    MGDA,
    RLW,
    GradientStrategy,
    GradNorm,
    PCGrad,
    Static,
    Sum,
    Uncertainty,
    UPGrad,
    WeightingStrategy,
    build_gradient,
    build_weighting,
    registry,
)
from mtl.strategies.mgda import min_norm_weights, project_simplex

TOL = {"rtol": 0.0, "atol": 1e-6}
AB = ["a", "b"]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def losses(**values: float) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(v) for name, v in values.items()}


# ------------------------------------------------------------------------------ sum and static


def test_sum_weights_one_and_total_is_plain_sum() -> None:
    s = Sum(AB, SumWeighting())
    total, w = s.combine(losses(a=2.0, b=0.5))
    assert_close(total, torch.tensor(2.5), **TOL)
    assert_close(w["a"], torch.tensor(1.0), **TOL)
    assert s.current_weights() == {"a": 1.0, "b": 1.0}


def test_static_alpha_form() -> None:
    s = Static(AB, StaticWeighting(alpha=0.3))
    total, w = s.combine(losses(a=2.0, b=1.0))
    assert_close(total, torch.tensor(0.3 * 2.0 + 0.7 * 1.0), **TOL)
    assert_close(w["b"], torch.tensor(0.7), **TOL)
    assert s.current_weights() == pytest.approx({"a": 0.3, "b": 0.7})


def test_static_dict_form_and_errors() -> None:
    s = Static(["x", "y", "z"], StaticWeighting(weights={"x": 2.0, "y": 0.0, "z": 0.5}))
    total, _ = s.combine(losses(x=1.0, z=4.0))  # only the tasks present
    assert_close(total, torch.tensor(2.0 + 2.0), **TOL)
    with pytest.raises(ValueError, match="exactly two"):
        Static(["x", "y", "z"], StaticWeighting(alpha=0.5))
    with pytest.raises(ValueError, match="missing"):
        Static(["x", "y"], StaticWeighting(weights={"x": 1.0}))


# ------------------------------------------------------------------------------- uncertainty


def test_uncertainty_total_and_gradient_at_zero() -> None:
    u = Uncertainty(AB, UncertaintyWeighting())
    total, w = u.combine(losses(a=2.0, b=0.5))
    # 0.5*e^0*2 + 0.5*e^0*0.5 + 0.5*(0 + 0)
    assert_close(total, torch.tensor(1.25), **TOL)
    assert_close(w["a"], torch.tensor(0.5), **TOL)
    total.backward()
    # d/ds_i = -0.5 e^{-s_i} L_i + 0.5
    assert_close(u.log_vars.grad, torch.tensor([-0.5, 0.25]), **TOL)
    assert u.extra_parameters() == [u.log_vars]


def test_uncertainty_at_log_loss_is_stationary() -> None:
    u = Uncertainty(AB, UncertaintyWeighting(lr=0.1))
    assert u.lr == 0.1
    with torch.no_grad():
        u.log_vars.copy_(torch.tensor([math.log(2.0), 0.0]))
    total, _ = u.combine(losses(a=2.0, b=0.5))
    assert_close(total, torch.tensor(0.25 * 2.0 + 0.5 * 0.5 + 0.5 * math.log(2.0)), **TOL)
    total.backward()
    assert_close(u.log_vars.grad, torch.tensor([0.0, 0.25]), **TOL)
    assert u.current_weights() == pytest.approx({"a": 0.25, "b": 0.5})


def test_uncertainty_regularizer_only_over_present_tasks() -> None:
    u = Uncertainty(["a", "b", "c"], UncertaintyWeighting())
    with torch.no_grad():
        u.log_vars.copy_(torch.tensor([1.0, 2.0, 3.0]))
    total, _ = u.combine(losses(b=1.0))
    assert_close(total, torch.tensor(0.5 * math.exp(-2.0) + 1.0), **TOL)
    total.backward()
    assert u.log_vars.grad is not None
    assert_close(u.log_vars.grad[[0, 2]], torch.zeros(2), **TOL)


# --------------------------------------------------------------------------------------- DWA


def run_dwa_epoch(d: DWA, steps: list[dict[str, float]]) -> None:
    for step in steps:
        d.observe(step)
    d.end_epoch()


def test_dwa_weights_after_three_epochs() -> None:
    d = DWA(AB, DWAWeighting(temperature=2.0))
    run_dwa_epoch(d, [{"a": 3.0, "b": 1.0}, {"a": 1.0}])  # means a=2, b=1
    assert d.current_weights() == {"a": 1.0, "b": 1.0}
    run_dwa_epoch(d, [{"a": 1.0, "b": 0.9}, {"b": math.nan}])  # NaN is ignored
    # r = (1/2, 0.9/1); w = 2 softmax(r / 2) = 2 / (1 + e^{0.2}), ...
    w = d.weights(losses(a=1.0, b=1.0))
    assert_close(torch.stack([w["a"], w["b"]]), torch.tensor([0.900332, 1.099668]), **TOL)
    run_dwa_epoch(d, [{"a": 0.5, "b": 0.8}])
    # r = (0.5/1, 0.8/0.9); w_a = 2 / (1 + e^{(0.8/0.9 - 0.5) / 2})
    cw = d.current_weights()
    assert cw == pytest.approx({"a": 0.903083, "b": 1.096917}, abs=1e-6)
    assert sum(cw.values()) == pytest.approx(2.0, abs=1e-12)


def test_dwa_state_dict_round_trip_mid_epoch() -> None:
    d = DWA(AB, DWAWeighting())
    run_dwa_epoch(d, [{"a": 2.0, "b": 1.0}])
    run_dwa_epoch(d, [{"a": 1.5, "b": 1.0}])
    d.observe({"a": 1.0, "b": 0.7})  # half-way through epoch 3
    resumed = DWA(AB, DWAWeighting())
    resumed.load_state_dict(d.state_dict())
    for strategy in (d, resumed):
        run_dwa_epoch(strategy, [{"a": 0.6, "b": 0.9}])
        run_dwa_epoch(strategy, [{"a": 0.5, "b": 0.3}])
    assert d.current_weights() != {"a": 1.0, "b": 1.0}
    assert_close(resumed.w, d.w, rtol=0.0, atol=0.0)
    assert_close(resumed.history, d.history, rtol=0.0, atol=0.0)


# --------------------------------------------------------------------------------------- RLW


def test_rlw_sums_to_task_count_and_is_repeatable() -> None:
    r = RLW(["a", "b", "c"], RLWWeighting())
    torch.manual_seed(7)
    first = r.weights(losses(a=1.0, b=1.0, c=1.0))
    second = r.weights(losses(a=1.0, b=1.0, c=1.0))
    assert_close(sum(first.values()), torch.tensor(3.0), **TOL)
    assert not torch.allclose(first["a"], second["a"])  # a fresh draw every call
    torch.manual_seed(7)
    again = r.weights(losses(a=1.0, b=1.0, c=1.0))
    assert_close(torch.stack(list(again.values())), torch.stack(list(first.values())), **TOL)
    torch.manual_seed(7)
    z = torch.randn(3)
    assert_close(again["b"], 3 * torch.softmax(z, 0)[1], **TOL)
    partial = r.weights(losses(c=2.0))  # one task present: weight K * softmax = 1
    assert_close(partial["c"], torch.tensor(1.0), **TOL)
    assert r.current_weights()["c"] == pytest.approx(1.0)
    assert r.current_weights()["a"] == pytest.approx(float(again["a"]))


# ---------------------------------------------------------------------------------- GradNorm


def test_gradnorm_moves_weight_to_the_task_with_the_smaller_gradient() -> None:
    g = GradNorm(AB, GradNormWeighting(alpha=1.5, lr=0.025))
    assert g.needs_task_grads
    # r = 1 at the first call; G = (1, 3), target = mean(G) = 2: grad of w = sign(G - 2) * |g|
    # First Adam step is lr * sign(grad): w = (1 + 0.025, 1 - 0.025), sum already 2.
    g.update_from_grads(losses(a=1.0, b=2.0), {"a": t(1.0, 0.0), "b": t(0.0, 3.0)})
    assert_close(g.w, t(1.025, 0.975), **TOL)
    assert_close(g.initial_losses, t(1.0, 2.0), **TOL)
    assert sum(g.current_weights().values()) == pytest.approx(2.0, abs=1e-12)


def test_gradnorm_renormalises_to_task_count() -> None:
    g = GradNorm(["a", "b", "c"], GradNormWeighting(lr=0.025))
    grads = {"a": t(1.0), "b": t(-1.0), "c": t(4.0)}
    g.update_from_grads(losses(a=1.0, b=1.0, c=1.0), grads)
    # G = (1, 1, 4), target 2: w = (1.025, 1.025, 0.975) * 3 / 3.025
    assert_close(g.w, t(1.016529, 1.016529, 0.966942), **TOL)
    assert float(g.w.sum()) == pytest.approx(3.0, abs=1e-12)


def test_gradnorm_lowers_the_weight_of_the_faster_training_task() -> None:
    g = GradNorm(AB, GradNormWeighting(alpha=1.5, lr=0.025))
    grads = {"a": t(1.0, 1.0), "b": t(1.0, -1.0)}  # equal norms
    g.update_from_grads(losses(a=1.0, b=1.0), grads)  # balanced: G == target, no move
    assert_close(g.w, t(1.0, 1.0), **TOL)
    # a's loss halved: r = (2/3, 4/3), target = (0.544, 1.540), G = (1, 1): grad = (+|g|, -|g|).
    # Adam step 2 with zero history: lr * (0.1 / 0.19) / sqrt(0.001 / (1 - 0.999^2)) = 0.018603
    g.update_from_grads(losses(a=0.5, b=1.0), grads)
    assert_close(g.w, t(0.981397, 1.018603), **TOL)


@pytest.mark.parametrize(
    ("alpha", "expected"), [(1.5, (0.981397, 1.018603)), (1.0, (1.018603, 0.981397))]
)
def test_gradnorm_alpha_sets_the_target(alpha: float, expected: tuple[float, float]) -> None:
    g = GradNorm(AB, GradNormWeighting(alpha=alpha, lr=0.025))
    g.update_from_grads(losses(a=1.0, b=1.0), {"a": t(1.0), "b": t(1.0)})  # no move
    # G = (0.6, 1.4), mean 1, r = (2/3, 4/3). alpha 1.5: target (0.544, 1.540), G_a above it;
    # alpha 1: target (0.667, 1.333), G_a below it. Step size as above: 0.018603.
    g.update_from_grads(losses(a=0.5, b=1.0), {"a": t(0.6), "b": t(0.0, 1.4)})
    assert_close(g.w, t(*expected), **TOL)


def test_gradnorm_single_task_only_records_its_initial_loss() -> None:
    g = GradNorm(AB, GradNormWeighting())
    g.update_from_grads(losses(b=3.0), {"b": t(5.0)})
    assert_close(g.w, t(1.0, 1.0), **TOL)
    assert math.isnan(float(g.initial_losses[0]))
    assert float(g.initial_losses[1]) == 3.0


def test_gradnorm_update_between_forward_and_backward() -> None:
    g = GradNorm(AB, GradNormWeighting())
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    total, _ = g.combine({"a": x[0] * 3, "b": x[1] ** 2})
    g.update_from_grads(losses(a=3.0, b=4.0), {"a": t(3.0), "b": t(1.0)})
    assert float(g.w[0]) != 1.0
    total.backward()  # the weights used in the graph are copies, not the updated buffer
    assert_close(x.grad, torch.tensor([3.0, 4.0]), **TOL)


def test_gradnorm_state_dict_round_trip() -> None:
    g = GradNorm(["a", "b", "c"], GradNormWeighting())
    gen = torch.Generator().manual_seed(0)
    steps = [
        (
            {n: torch.rand((), generator=gen) + 0.1 for n in "abc"},
            {n: torch.randn(4, generator=gen, dtype=torch.float64) for n in "abc"},
        )
        for _ in range(6)
    ]
    for loss, grad in steps[:3]:
        g.update_from_grads(loss, grad)
    resumed = GradNorm(["a", "b", "c"], GradNormWeighting())
    resumed.load_state_dict(g.state_dict())
    for loss, grad in steps[3:]:
        g.update_from_grads(loss, grad)
        resumed.update_from_grads(loss, grad)
    assert not torch.allclose(g.w, torch.ones(3, dtype=torch.float64))
    assert_close(resumed.w, g.w, rtol=0.0, atol=0.0)


def test_uncertainty_state_dict_round_trip() -> None:
    u = Uncertainty(AB, UncertaintyWeighting())
    opt = torch.optim.SGD(u.extra_parameters(), lr=0.5)
    total, _ = u.combine(losses(a=2.0, b=0.5))
    total.backward()
    opt.step()
    resumed = Uncertainty(AB, UncertaintyWeighting())
    resumed.load_state_dict(u.state_dict())
    w0, w1 = u.weights(losses(a=1.0, b=1.0)), resumed.weights(losses(a=1.0, b=1.0))
    assert_close(w1["a"], w0["a"], rtol=0.0, atol=0.0)
    # s = -0.5 * (-0.5, 0.25) = (0.25, -0.125)
    assert_close(w1["b"], torch.tensor(0.5 * math.exp(0.125)), **TOL)


# ------------------------------------------------------------------------------------ PCGrad


def test_pcgrad_conflicting_pair() -> None:
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # g1' = g1 - (-1 / 2) g2 = (0.5, 0.5); g2' = g2 - (-1 / 1) g1 = (0, 1) (original g1)
    assert_close(PCGrad(AB).combine(grads), torch.tensor([0.5, 1.5]), **TOL)
    assert_close(grads, torch.tensor([[1.0, 0.0], [-1.0, 1.0]]), **TOL)  # input untouched


def test_pcgrad_non_conflicting_unchanged() -> None:
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    assert_close(PCGrad(["a", "b", "c"]).combine(grads), torch.tensor([2.0, 3.0]), **TOL)


def test_pcgrad_order_follows_the_global_rng() -> None:
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        perms = [torch.randperm(3).tolist() for _ in range(3)]
        # by hand: g1' = (0.5, 0) if g2 is visited before g3 else (0.5, 0.5); g2' = (0, 0);
        # g3' = (-0.5, -0.5) if g1 before g2 else (0, -0.5)
        first_2 = perms[0].index(1) < perms[0].index(2)
        first_1 = perms[2].index(0) < perms[2].index(1)
        g1 = [0.5, 0.0] if first_2 else [0.5, 0.5]
        g3 = [-0.5, -0.5] if first_1 else [0.0, -0.5]
        seen.add((first_2, first_1))
        torch.manual_seed(seed)
        out = PCGrad(["a", "b", "c"]).combine(grads)
        assert_close(out, torch.tensor([g1[0] + g3[0], g1[1] + g3[1]]), **TOL)
    assert len(seen) == 4  # every order combination was exercised


# -------------------------------------------------------------------------------------- MGDA


def test_mgda_two_vectors_closed_form() -> None:
    grads = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # a1 = (4 - 0) / (1 + 4 - 0) = 0.8: min-norm point (0.8, 0.4), times T = 2
    assert_close(MGDA(AB).combine(grads), torch.tensor([1.6, 0.8]), **TOL)


def test_mgda_dominating_vector() -> None:
    # g1 . (g2 - g1) = 1 > 0: the min-norm point is g1 itself
    assert_close(MGDA(AB).combine(torch.tensor([[1.0, 0.0], [2.0, 1.0]])), t(2.0, 0.0).float())
    grads = torch.tensor([[0.1, 0.1], [1.0, 0.5], [0.5, 1.0]])
    assert_close(MGDA(["a", "b", "c"]).combine(grads), torch.tensor([0.3, 0.3]), **TOL)


def test_mgda_three_vectors_hand_cases() -> None:
    three = ["a", "b", "c"]
    # the hull contains the origin (1/3 each)
    around = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    assert_close(MGDA(three).combine(around), torch.zeros(2), **TOL)
    # optimum on the edge g1-g2 at (0.8, 0.4); g3 does not enter: 3 * (0.8, 0.4)
    edge = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    assert_close(MGDA(three).combine(edge), torch.tensor([2.4, 1.2]), **TOL)
    gram = (edge @ edge.T).double()
    assert_close(min_norm_weights(gram), t(0.8, 0.2, 0.0), **TOL)


def test_mgda_three_vectors_beats_a_fine_grid() -> None:
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(3, 5, generator=gen, dtype=torch.float64) + t(1, 0, 0, 0, 0)
    point = MGDA(["a", "b", "c"]).combine(grads) / 3
    steps = 200
    best = math.inf
    for i, j in itertools.product(range(steps + 1), repeat=2):
        if i + j <= steps:
            a = t(i / steps, j / steps, (steps - i - j) / steps)
            best = min(best, float((a @ grads).norm()))
    assert float(point.norm()) <= best + 1e-9
    assert float(point.norm()) >= best - 1e-2  # and the grid gets close to it


def test_project_simplex() -> None:
    assert_close(project_simplex(t(0.5, 0.5, 0.0)), t(0.5, 0.5, 0.0), **TOL)
    assert_close(project_simplex(t(2.0, 0.0, 0.0)), t(1.0, 0.0, 0.0), **TOL)
    assert_close(project_simplex(t(0.0, 0.0, 0.0)), t(1 / 3, 1 / 3, 1 / 3), **TOL)
    assert_close(project_simplex(t(1.0, 0.5, -1.0)), t(0.75, 0.25, 0.0), **TOL)


def test_none_is_the_plain_sum() -> None:
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    strategy = build_gradient(GradientConfig(), AB)
    assert type(strategy) is GradientStrategy
    assert_close(strategy.combine(grads), torch.tensor([0.0, 1.0]), **TOL)


# ---------------------------------------------------------------------------------- registry


def test_registry_names_match_the_config() -> None:
    assert tuple(registry.WEIGHTINGS) == WEIGHTING_NAMES
    assert tuple(registry.GRADIENTS) == GRADIENT_NAMES


def test_register_rejects_non_subclasses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "WEIGHTINGS", dict(registry.WEIGHTINGS))
    monkeypatch.setattr(registry, "GRADIENTS", dict(registry.GRADIENTS))
    with pytest.raises(TypeError, match="not a subclass of WeightingStrategy"):
        registry.register_weighting("pc", PCGrad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        registry.register_weighting("obj", object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a subclass of GradientStrategy"):
        registry.register_gradient("sum", Sum)  # type: ignore[arg-type]
    assert "pc" not in registry.WEIGHTINGS and "sum" not in registry.GRADIENTS


def test_register_warns_on_overwrite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "WEIGHTINGS", dict(registry.WEIGHTINGS))
    monkeypatch.setattr(registry, "GRADIENTS", dict(registry.GRADIENTS))

    class MySum(Sum):
        pass

    with pytest.warns(UserWarning, match="'sum' is already registered"):
        registry.register_weighting("sum", MySum)
    assert registry.WEIGHTINGS["sum"] is MySum
    with pytest.warns(UserWarning, match="'mgda' is already registered"):
        registry.register_gradient("mgda", PCGrad)
    registry.register_weighting("brand-new", MySum)  # no warning (warnings are errors here)


def test_build_from_pydantic_models() -> None:
    cases: list[tuple[object, type[WeightingStrategy]]] = [
        (SumWeighting(), Sum),
        (StaticWeighting(alpha=0.25), Static),
        (UncertaintyWeighting(lr=0.01), Uncertainty),
        (DWAWeighting(temperature=3.0), DWA),
        (RLWWeighting(), RLW),
        (GradNormWeighting(alpha=0.5), GradNorm),
    ]
    for params, cls in cases:
        strategy = build_weighting(params, AB)  # type: ignore[arg-type]
        assert type(strategy) is cls and strategy.task_names == AB
    for name, gcls in [("none", GradientStrategy), ("pcgrad", PCGrad), ("mgda", MGDA)]:
        assert type(build_gradient(GradientConfig(name=name), AB)) is gcls

    cfg = load_config(
        {
            "tasks": [{"name": "a", "num_classes": 2}, {"name": "b", "num_classes": 3}],
            "data": {"kind": "dummy"},
            "weighting": {"name": "gradnorm", "alpha": 0.5, "lr": 0.1},
            "gradient": {"name": "pcgrad"},
        }
    )
    gn = build_weighting(cfg.weighting, cfg.task_names)
    assert isinstance(gn, GradNorm) and (gn.alpha, gn.lr) == (0.5, 0.1)
    assert isinstance(build_gradient(cfg.gradient, cfg.task_names), PCGrad)


def test_build_unknown_name(monkeypatch: pytest.MonkeyPatch) -> None:
    known = {k: v for k, v in registry.WEIGHTINGS.items() if k != "rlw"}
    monkeypatch.setattr(registry, "WEIGHTINGS", known)
    with pytest.raises(ValueError, match=r"unknown weighting 'rlw'; known: \['dwa'"):
        build_weighting(RLWWeighting(), AB)
    monkeypatch.setattr(registry, "GRADIENTS", {})
    with pytest.raises(ValueError, match="unknown gradient strategy 'none'"):
        build_gradient(GradientConfig(), AB)


# ------------------------------------------------------------------------------------- FAMO


def famo(lr: float = 0.025, gamma: float = 0.01) -> FAMO:
    return FAMO(["a", "b"], FAMOWeighting(lr=lr, gamma=gamma))


def test_famo_first_step_weights_are_c_z_over_loss() -> None:
    """Algorithm 1: z = softmax(xi) (uniform at start), c = 1 / sum(z_i / L_i), and the model
    follows sum_i c * z_i / L_i * grad L_i."""
    strategy = famo()
    la = torch.tensor(2.0, requires_grad=True)
    lb = torch.tensor(0.5, requires_grad=True)
    total, w = strategy.combine({"a": la, "b": lb})
    c = 1 / (0.5 / 2.0 + 0.5 / 0.5)
    assert_close(w["a"], torch.tensor(c * 0.5 / 2.0))
    assert_close(w["b"], torch.tensor(c * 0.5 / 0.5))
    total.backward()
    # the same gradient as c * sum_i z_i * grad log L_i
    assert_close(la.grad, torch.tensor(c * 0.5 / 2.0))
    assert_close(lb.grad, torch.tensor(c * 0.5 / 0.5))
    assert torch.equal(strategy.xi, torch.zeros(2))  # nothing to learn from yet


def test_famo_logit_update_follows_the_log_loss_decrease() -> None:
    """delta = log L(t-1) - log L(t); grad_xi = J_softmax(xi)^T delta; one Adam step (its first
    step moves each logit by lr against the sign of its gradient)."""
    lr = 0.1
    strategy = famo(lr=lr, gamma=0.0)
    strategy.combine({"a": torch.tensor(2.0), "b": torch.tensor(1.0)})
    # task a's loss halves, task b's barely moves: b lags, so its logit must grow
    strategy.combine({"a": torch.tensor(1.0), "b": torch.tensor(0.99)})
    delta = torch.tensor([math.log(2.0), math.log(1.0 / 0.99)])
    z = torch.tensor([0.5, 0.5])
    jacobian = torch.diag(z) - torch.outer(z, z)
    grad = jacobian.T @ delta  # the paper's gradient of the logits
    assert grad[0] > 0 > grad[1]
    assert_close(strategy.xi, -lr * torch.sign(grad), atol=1e-6, rtol=0)
    _, w = strategy.combine({"a": torch.tensor(1.0), "b": torch.tensor(1.0)})
    z_now = torch.softmax(strategy.xi, 0)  # after this forward's own logit step
    assert_close(torch.stack([w["a"], w["b"]]), z_now)  # equal losses: w = z
    assert float(w["b"]) > 0.5 > float(w["a"])  # the lagging task weighs more


def test_famo_weight_decay_pulls_the_logits_back() -> None:
    strategy = famo(lr=0.1, gamma=0.5)
    losses = [(2.0, 1.0), (1.0, 0.99), (0.5, 0.98), (0.25, 0.97)]
    for la, lb in losses:
        strategy.combine({"a": torch.tensor(la), "b": torch.tensor(lb)})
    no_decay = famo(lr=0.1, gamma=0.0)
    for la, lb in losses:
        no_decay.combine({"a": torch.tensor(la), "b": torch.tensor(lb)})
    assert 0 < float(strategy.xi[1]) < float(no_decay.xi[1])


def test_famo_absent_task_keeps_its_logit_and_the_state_round_trips() -> None:
    strategy = famo(lr=0.1)
    strategy.combine({"a": torch.tensor(2.0), "b": torch.tensor(1.0)})
    strategy.combine({"a": torch.tensor(1.0)})  # b absent: only a's delta
    _, w = strategy.combine({"a": torch.tensor(0.9)})
    assert_close(w["a"], torch.tensor(1.0))  # renormalised over the tasks present
    clone = famo(lr=0.1)
    clone.load_state_dict(strategy.state_dict())
    for la, lb in [(0.8, 0.9), (0.7, 0.85), (0.6, 0.84)]:
        _, w1 = strategy.combine({"a": torch.tensor(la), "b": torch.tensor(lb)})
        _, w2 = clone.combine({"a": torch.tensor(la), "b": torch.tensor(lb)})
        assert torch.equal(w1["a"], w2["a"]) and torch.equal(w1["b"], w2["b"])
    assert torch.equal(strategy.xi, clone.xi)
    assert float(strategy.adam_step) == float(clone.adam_step) == 5  # one per later forward


# ------------------------------------------------------------------------------------ UPGrad


def dual_cone_projection(g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The projection of `g` onto {x : x . r >= 0 for every row r}, for two rows (the paper's
    eq. 3), by cases: inside, onto one face, or onto the cone's apex."""
    candidates = [g]
    for r in rows:
        candidates.append(g - torch.dot(g, r) / torch.dot(r, r) * r)
    candidates.append(torch.zeros_like(g))
    feasible = [x for x in candidates if all(float(torch.dot(x, r)) >= -1e-9 for r in rows)]
    return min(feasible, key=lambda x: float((x - g).norm()))


@pytest.mark.parametrize(
    "rows",
    [
        [[1.0, 0.0], [-0.5, 1.0]],  # conflicting: both rows are projected
        [[1.0, 0.2], [0.3, 1.0]],  # no conflict: the mean of the rows
        [[2.0, 1.0, 0.0], [-1.0, 0.5, 3.0]],
    ],
)
def test_upgrad_is_the_sum_of_the_dual_cone_projections(rows: list[list[float]]) -> None:
    """The paper's mean of projections, times T (the size of `none`, like `mgda`)."""
    jacobian = torch.tensor(rows, dtype=torch.float64)
    expected = torch.stack([dual_cone_projection(g, jacobian) for g in jacobian]).sum(0)
    got = UPGrad(["a", "b"]).combine(jacobian)
    assert_close(got, expected, atol=4e-3, rtol=2e-3)  # torchjd regularises the Gramian
    for row in jacobian:  # conflicts with no task
        assert float(torch.dot(got, row)) >= -1e-6


def test_upgrad_conflicting_pair_hand_values() -> None:
    got = UPGrad(["a", "b"]).combine(torch.tensor([[1.0, 0.0], [-0.5, 1.0]]))
    # pi(g1) = (0.8, 0.4), pi(g2) = (0, 1): the mean is (0.4, 0.7), times T = 2
    assert_close(got, torch.tensor([0.8, 1.4]), atol=4e-3, rtol=0)
    # no conflict: exactly the plain sum
    rows = torch.tensor([[1.0, 0.2], [0.3, 1.0]])
    assert_close(UPGrad(["a", "b"]).combine(rows), rows.sum(0), atol=4e-3, rtol=0)
