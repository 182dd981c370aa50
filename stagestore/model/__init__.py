"""The data model, at the bottom of the layers: every record on disk (`records`), every report a
library call returns (`reports`), the failure vocabulary (`failures`) and sizes (`sizes`).
Imports nothing of stagestore but `errors`."""
