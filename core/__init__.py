"""The bottom layer every other package shares: the run-config schema
(`config`), the update codec (`codec`), numpy <-> Flower record conversion
(`records`) and the parameter naming scheme (`naming`). No torch here, so
strategies/ can use it."""
