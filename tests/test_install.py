"""`scripts/pick-python`: the interpreter `make install` makes the virtual environment with.

Each case puts stand-in interpreters on a PATH of their own: shell scripts that answer the
script's three questions (suitable? optimized? which file am I?) as told, so that every
branch is taken on any machine."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "pick-python")
BASH = shutil.which("bash")


def stand_in(path: str, suitable: bool = True, optimized: bool = False) -> str:
    """A `python3` stand-in at ``path``, telling the script what it is."""
    with open(path, "w") as f:
        f.write(f"""#!/bin/sh
case "$2" in
  *ensurepip*) exit {0 if suitable else 1} ;;
  *enable-optimizations*) exit {0 if optimized else 1} ;;
  *realpath*) echo "{path}" ;;
esac
""")
    os.chmod(path, 0o755)
    return path


def pick(tmp_path, on_path=None, system=None):
    """What the script prints, what it says, and where the stand-in system python3 is."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if on_path is not None:
        stand_in(str(bin_dir / "python3"), **on_path)
    system_path = str(tmp_path / "system-python3")
    if system is not None:
        stand_in(system_path, **system)
    # PATH holds the stand-in alone: the script needs nothing else from it
    env = {"PATH": str(bin_dir), "SYSTEM_PYTHON": system_path}
    done = subprocess.run([BASH, SCRIPT], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), done.stderr, system_path


@pytest.mark.parametrize("on_path, system, chosen, why", [
    # the usual case on a fresh machine: PATH's python3 is the system's (or optimized)
    ({"optimized": True}, {}, "python3", ""),
    # pyenv's default build on PATH, a system python3 that will do: the system's
    ({}, {}, "system", "without profile-guided optimization: using the system's"),
    # ... but not a system python3 without venv, or older than 3.9: PATH's, with a word
    ({}, {"suitable": False}, "python3", "siocluster runs slower on it"),
    # no python3 on PATH at all
    (None, {}, "system", "python3 is not on PATH"),
    (None, {"suitable": False}, "python3", ""),
    # no system python3: PATH's, whatever it is
    ({}, None, "python3", ""),
])
def test_pick_python_prefers_an_optimized_build(tmp_path, on_path, system, chosen, why):
    out, err, system_path = pick(tmp_path, on_path, system)
    assert out == (system_path if chosen == "system" else "python3")
    if why:
        assert why in err
    else:
        assert err == ""


def test_pick_python_keeps_path_python3_when_it_is_the_systems(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    own = stand_in(str(bin_dir / "python3"))          # not optimized by its flags (Debian's)
    done = subprocess.run([BASH, SCRIPT], capture_output=True, text=True, timeout=30,
                          env={"PATH": str(bin_dir), "SYSTEM_PYTHON": own})
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "python3", "")
