"""`ratequeue run` and accounts: a batch is the input *and* the account it is sent with. Running the
same input with another `--account` neither continues the other account's batch (its jobs would go
out with the other account's key) nor silently pays for its lines again: it says what to do.

Real `ratequeue run` subprocesses (embedded Redis in the input's data directory under a private
HOME, real workers), one simulator per account, each taking only its own account's key.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ratequeue.sim.process import start_sim
from tests.test_run_lifecycle import RATEQUEUE, result_ids, user_env, write_input

pytestmark = pytest.mark.e2e  # subprocesses

KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-team-b-fedcba9876543210"


def test_run_with_another_account_refuses_to_continue_and_each_account_keeps_its_own_batch(tmp_path: Path) -> None:
    with start_sim(["--api-key", KEY_A]) as a, start_sim(["--api-key", KEY_B]) as b:
        models = tmp_path / "models.toml"
        models.write_text(f'default_account = "team-a"\n[accounts.team-a]\nbase_url = "{a.url}"\n'
                          f'api_key_env = "KEY_A"\n[accounts.team-b]\nbase_url = "{b.url}"\napi_key_env = "KEY_B"\n')
        src = write_input(tmp_path / "in.jsonl", "j", 6)
        out = tmp_path / "out.jsonl"

        def run(*args: str, key_a: str = KEY_A) -> subprocess.CompletedProcess[str]:
            env = user_env(tmp_path, "http://127.0.0.1:9", RATEQUEUE_MODELS_FILE=str(models), KEY_A=key_a,
                           KEY_B=KEY_B)
            return subprocess.run([*RATEQUEUE, "run", "--no-check", str(src), "-o", str(out), *args], env=env,
                                  cwd=tmp_path, capture_output=True, text=True, timeout=120)

        # Team a's key is refused: the run stops, its batch unfinished (the user may turn to team b).
        refused = run("--account", "team-a", key_a="sk-team-a-revoked-0000000000")
        assert refused.returncode == 1, refused.stderr
        other = run("--account", "team-b")
        assert other.returncode == 2, other.stderr
        message = other.stderr.strip().splitlines()[-1]
        assert message.startswith("error: batch batch_") and "account 'team-a'" in message
        assert "--account team-a" in message and "--fresh" in message, message
        assert b.stats(timeline=False)["requests_total"] == 0  # nothing went out with either key
        fresh = run("--account", "team-b", "--fresh")
        assert fresh.returncode == 0, fresh.stderr
        assert sorted(result_ids(out)) == [f"j-{n}" for n in range(6)]
        assert b.stats(timeline=False)["by_status"] == {"200": 6}
        again = run("--account", "team-b")  # team b's own batch, ended: found, not sent again
        assert again.returncode == 0 and "already completed" in again.stderr, again.stderr
        assert b.stats(timeline=False)["requests_total"] == 6
        resumed = run()  # the default account, team a, key fixed: its own batch continues
        assert resumed.returncode == 0, resumed.stderr
        assert "continuing batch" in resumed.stderr
        assert a.stats(timeline=False)["by_status"].get("200") == 6
