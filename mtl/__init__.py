"""mtl: multi-task training of transformer sentence encoders.

`import mtl` is light: it loads neither torch nor any web or queue code. The heavy parts
(`mtl.model`, `mtl.trainer`, `mtl.predict`) are imported where they are used.
"""

__version__ = "0.1.0"
