"""``python -m ratequeue.sim``: the simulator's command line."""

from __future__ import annotations

from ratequeue.sim.cli import sim_command

if __name__ == "__main__":
    sim_command(prog_name="python -m ratequeue.sim")
