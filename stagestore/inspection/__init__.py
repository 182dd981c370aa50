"""What the store says and what keeps it right, one module per CLI word: `verify`, `recover`,
`gc` (and forget), `diff`, `checkout`, `status` (and runs, show, logs, contracts), `doctor`,
`plan` (and check), `stats` and `report`."""
