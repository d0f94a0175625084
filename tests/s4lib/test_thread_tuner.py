"""The fused step's thread tuner (kernels/step_team.h, ThreadTuner) on scripted timings.

The tuner only chooses a thread count (results never depend on it), so it is tested on its own: a small
C++ program feeds it made-up timings of "one thread" and "the team" and prints the choices it makes.
"""

import os
import shutil
import subprocess

import pytest
from conftest import skip_unless_ci

KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "kernels")

# argv: calls, then phases "until:one:team" (per-unit seconds of each choice up to call `until`); prints
# the thread count picked at every call
PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "step_team.h"

int main(int argc, char** argv) {
  s4step::ThreadTuner tuner;
  std::vector<long> until; std::vector<double> one, team;
  for (int i = 1; i < argc; ++i) {
    long u; double a, b;
    if (std::sscanf(argv[i], "%ld:%lf:%lf", &u, &a, &b) != 3) return 2;
    until.push_back(u); one.push_back(a); team.push_back(b);
  }
  size_t phase = 0;
  for (long call = 0; call < until.back(); ++call) {
    while (call >= until[phase]) ++phase;
    const int threads = tuner.pick(2);
    tuner.record(threads, threads > 1 ? team[phase] : one[phase]);
    std::printf("%d\n", threads);
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def tuner(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        skip_unless_ci("no C++ compiler")
    folder = tmp_path_factory.mktemp("tuner")
    (folder / "tuner.cpp").write_text(PROGRAM)
    exe = folder / "tuner"
    subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-I", KERNELS, str(folder / "tuner.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)

    def run(*phases: tuple[int, float, float]) -> list[int]:
        args = [f"{until}:{one}:{team}" for until, one, team in phases]
        out = subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout
        return [int(line) for line in out.split()]

    return run


def test_settles_on_the_faster_choice_and_retries_the_other_rarely(tuner):
    picks = tuner((1000, 1.0, 0.6))  # the team is faster
    assert picks[100:].count(2) / 900 > 0.9
    picks = tuner((1000, 1.0, 1.6))  # one thread is faster
    late = picks[100:]
    assert late.count(1) / 900 > 0.95 and late.count(2) > 0  # the team is still retried now and then


def test_follows_the_team_back_after_a_load_spike(tuner):
    """A spike makes the team look 3x slower for 200 calls; once it ends, the first retrial of the team
    (at most 64 calls later) brings it back: its timings from the spike are not kept."""
    picks = tuner((300, 1.0, 0.6), (500, 1.0, 3.0), (1000, 1.0, 0.6))
    assert picks[300 + 50:500].count(1) / 150 > 0.9  # during the spike: one thread
    back = next(i for i in range(500, 1000) if picks[i:i + 20].count(2) >= 18)
    assert back - 500 <= 64 + 10, f"back on the team only {back - 500} calls after the spike ended"
    assert picks[back:].count(2) / len(picks[back:]) > 0.9


def test_a_short_spell_of_a_faster_team_does_not_stick(tuner):
    """The team is faster for 64 calls only: the tuner moves to it on its retrial and leaves it again
    within a few calls once it is slower."""
    picks = tuner((1000, 1.0, 1.6), (1064, 1.0, 0.1), (2000, 1.0, 1.6))
    assert picks[1000:1064].count(2) >= 2
    assert picks[1074:].count(1) / len(picks[1074:]) > 0.95
