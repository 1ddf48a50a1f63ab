"""Metadata conditioning on leveled PCFG data (PCFG.md): grammar generator with metadata, encoding, exact inference.

``fastattn.pcfg.LeveledPCFG`` samples and encodes documents; ``fastattn.pcfg.inference`` holds the exact
inside/prefix dynamic programme (``LeveledPCFG.inside`` is a shortcut). Importing this package loads torch only.
"""
from .grammar import LeveledPCFG, PCFGConfig, PCFGSample
from .inference import InsideResult, conditional, inside

__all__ = ["LeveledPCFG", "PCFGConfig", "PCFGSample", "InsideResult", "conditional", "inside"]
