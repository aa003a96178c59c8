"""Layers that several methods share, each in a module named for what it holds.

A method file imports these instead of another method's module, so an edit to one method's
file retrains only that method's runs (the code hash follows imports). Nothing here imports
the engine, the grid or the data code.
"""
