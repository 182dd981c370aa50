"""What an attempt reads: its workspace inputs and upstream outputs, as stored artifacts.

Its own module, below both `stagework` (which builds it) and `attempt` (which lays it out), so
that neither imports the other's module for it.
"""

from __future__ import annotations

from ..model.records import ArtifactRef


class StageInputs:
    """What an attempt reads: its workspace inputs and upstream outputs, as stored artifacts."""

    def __init__(self, workspace: dict[str, ArtifactRef], upstream: dict[str, dict[str, ArtifactRef]],
                 basenames: dict[str, str]) -> None:
        self.workspace = workspace  # input name -> ref
        self.upstream = upstream  # stage -> output name -> ref
        self.basenames = basenames  # input name -> file name to show a file input under
