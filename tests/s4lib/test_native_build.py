"""How native modules are built, cached, trusted and reported: flags from one function, failures
remembered per cache key with their log, one-line fallback messages, `s4lib info`'s three states,
libraries loaded only from a private folder after their sha256 matched, and a fresh build of every
native module checked against its oracle."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import skip_unless_ci

from s4lib.ops import native_build, native_cache
from s4lib.ops.reference import cauchy_ref, log_vandermonde_ref

REPO = Path(__file__).resolve().parents[2]
COLLECTED_AT = time.time()  # before any test of the session runs

# A compiler that always fails; each compile of one of the project's sources is counted in a file.
FAILING_COMPILER = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "failing-c++ 1.0"; exit 0; fi
for a in "$@"; do case "$a" in *_cpu.cpp) echo "$a" >> "{count}";; esac; done
echo "kernel.cpp:1:1: error: this compiler always fails" >&2
exit 1
"""

# A child process: the first native op (timed), two more, an S4 forward, and every warning raised.
FALLBACK_SCRIPT = textwrap.dedent("""
    import json, time, warnings
    t_import = time.perf_counter()
    import torch, s4lib
    from s4lib import ops
    from s4lib.ops.reference import cauchy_ref, log_vandermonde_ref
    torch.manual_seed(0)
    v, w, z = (torch.randn(3, 4, dtype=torch.cfloat), torch.randn(3, 4, dtype=torch.cfloat),
               torch.randn(50, dtype=torch.cfloat))
    x = torch.complex(-torch.rand(3, 4), torch.randn(3, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops.cauchy(v, z, w, backend="chunked")  # torch's own first-call imports, outside the timing
        t0 = time.perf_counter()
        r1 = ops.cauchy(v, z, w, backend="native")
        first_op = time.perf_counter() - t0
        r2 = ops.cauchy(v, z, w, backend="native")
        K = ops.log_vandermonde(v, x, 40, backend="native")
        t0 = time.perf_counter()
        y, _ = s4lib.S4Block(8, d_state=16, transposed=False)(torch.randn(2, 64, 8))
        s4_forward = time.perf_counter() - t0
    print(json.dumps({
        "status": ops.backend_status("native"),
        "warnings": [str(m.message) for m in caught if issubclass(m.category, RuntimeWarning)],
        "cauchy_err": (r1 - cauchy_ref(v, z, w)).abs().max().item() + (r2 - r1).abs().max().item(),
        "vandermonde_err": (K - log_vandermonde_ref(v, x, 40)).abs().max().item(),
        "first_op": first_op, "s4_forward": s4_forward,
    }))
""")


def _fast_step():
    """The fused step engine's module."""
    from sashimi.pipelines import fast_step

    return fast_step


def _engine() -> "native_build.Module":
    """The fused step engine's recipe, as its module declares it."""
    _fast_step()
    return next(m for m in native_build.declared_modules() if m.name == "sashimi_step_cpu")


def _env(cache: Path, compiler: str | None = None, **extra) -> dict:
    env = dict(os.environ, S4LIB_CACHE=str(cache), S4LIB_BACKEND="auto",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    if compiler is not None:
        env["CXX"] = compiler
    return env


def _python(code: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _report(env: dict) -> dict:
    return json.loads(_python(FALLBACK_SCRIPT, env).stdout.strip().splitlines()[-1])


def _count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture()
def failing_compiler(tmp_path):
    """(path of a compiler that always fails, file counting its compiles of the project's sources)."""
    count = tmp_path / "compiles.txt"
    script = tmp_path / "bin" / "failing-c++"
    script.parent.mkdir()
    script.write_text(FAILING_COMPILER.format(count=count))
    script.chmod(0o755)
    return script, count


# ------------------------------------------------------------------------------------ flags


def test_build_flags_come_from_one_function_and_name_no_cxx_standard(monkeypatch, tmp_path):
    """Every native module is compiled with build_flags(its extra flags), which never holds -std=
    (torch's extension builder adds the standard the torch in use needs: C++20 for torch >= 2.14)."""
    flags = native_build.build_flags()
    assert flags[: len(native_build.BASE_CFLAGS)] == native_build.BASE_CFLAGS
    assert not [f for f in flags if "std" in f], flags
    assert set(flags) - set(native_build.BASE_CFLAGS) <= set(native_build.OPTIONAL_CFLAGS)
    with pytest.raises(ValueError, match="C\\+\\+ standard comes from torch"):
        native_build.build_flags(("-std=c++17",))
    for root in ("s4lib", "sashimi"):
        for path in (REPO / root).rglob("*.py"):
            assert not re.search(r"-std=c\+\+\d", path.read_text()), f"{path} hard-codes a C++ standard"

    # what each module's build hands to torch.utils.cpp_extension.load
    calls = []

    class FakeCppExtension:
        @staticmethod
        def load(**kwargs):
            calls.append(kwargs)
            raise RuntimeError("error: not really compiling")

    monkeypatch.setattr(native_build, "_loaded", {})  # this process may hold real builds: build anew
    monkeypatch.setattr(native_build, "_failed", {})
    monkeypatch.setattr(native_build, "_cpp_extension", lambda: FakeCppExtension)
    monkeypatch.setattr(native_build, "ninja_found", lambda: True)
    monkeypatch.setenv("S4LIB_CACHE", str(tmp_path / "cache"))
    engine = _engine()
    with pytest.raises(native_build.NativeBuildError):
        native_build.load()
    with pytest.raises(native_build.NativeBuildError):
        native_build.load_module(engine.name, engine.sources, engine.extra_cflags)
    assert [c["name"] for c in calls] == [native_build.KERNELS, engine.name]
    assert calls[0]["extra_cflags"] == list(native_build.build_flags())
    assert calls[1]["extra_cflags"] == list(native_build.build_flags(engine.extra_cflags))
    assert all(c["extra_ldflags"] == list(native_build.link_flags()) for c in calls)


def test_optional_flags_are_probed_per_compiler(failing_compiler):
    """A compiler that rejects everything gets none of the optional flags (-march=native ...)."""
    script, _ = failing_compiler
    code = "from s4lib.ops import native_build as nb; print(repr(nb.build_flags()))"
    out = _python(code, _env(script.parent.parent / "cache", str(script)))
    assert eval(out.stdout.strip()) == native_build.BASE_CFLAGS
    if shutil.which("c++"):
        assert "-march=native" in native_build.build_flags() or sys.platform == "darwin"


# ------------------------------------------------------------------------------------ failures


def test_failed_build_is_remembered_per_cache_key(tmp_path, failing_compiler):
    """A failing compiler is run once per cache key: a second process falls back at once with a
    one-line warning (what is off, why, the command for the log); another compiler tries again."""
    script, count = failing_compiler
    cache = tmp_path / "cache"
    first = _report(_env(cache, str(script)))
    attempts = _count(count)
    assert attempts >= 1
    assert first["status"][0] is False and "this compiler always fails" in first["status"][1]

    second = _report(_env(cache, str(script)))
    assert _count(count) == attempts, "the failed build was attempted again"
    assert second["first_op"] < 1.0, f"fallback took {second['first_op']:.2f} s"
    native = [m for m in second["warnings"] if "'native'" in m]
    assert len(native) == 1, second["warnings"]
    message = native[0]
    assert "\n" not in message and len(message) < 220, message
    assert "'native' off, using 'chunked'" in message and "build failed: this compiler always fails" in message
    assert native_build.LOG_COMMAND in message
    assert second["cauchy_err"] < 1e-5 and second["vandermonde_err"] < 1e-5

    logs = list(cache.glob(f"{native_build.KERNELS}-*/build.log"))
    assert len(logs) == 1 and "this compiler always fails" in logs[0].read_text()
    record = json.loads((logs[0].parent / "failed.json").read_text())
    assert record["log"] == str(logs[0])

    other = script.with_name("another-c++")  # another compiler: a new key, a new attempt
    shutil.copy(script, other)
    _report(_env(cache, str(other)))
    assert _count(count) > attempts


@pytest.mark.parametrize("compiler", ["/nonexistent/c++", "false"])
def test_missing_or_broken_compiler_warns_once_and_falls_back(tmp_path, compiler):
    report = _report(_env(tmp_path / "cache", compiler))
    assert report["status"][0] is False
    native = [m for m in report["warnings"] if "'native'" in m]
    assert len(native) == 1, report["warnings"]
    assert ("not found" if compiler.startswith("/") else "build failed") in native[0]
    assert "\n" not in native[0]
    assert report["cauchy_err"] < 1e-5 and report["vandermonde_err"] < 1e-5


def test_summarize_finds_the_first_error():
    log = ("[1/4] c++ -c cauchy_cpu.cpp\nFAILED: cauchy_cpu.o\n"
           "/x/torch/include/ATen/core/TensorBase.h:1048:3: error: 'requires' does not name a type\n"
           "   1048 |   requires std::is_same_v<T, int>\nninja: build stopped: subcommand failed.\n")
    assert native_build.summarize(log) == "'requires' does not name a type"
    assert native_build.summarize("ld: cannot find -lgomp\n") == "cannot find -lgomp"
    assert len(native_build.summarize("error: " + "x" * 500)) <= 72
    assert native_build.summarize("[1/2] c++ -c a.cpp\n") is None


# ------------------------------------------------------------------------------------ s4lib info


def _info(env: dict, *flags) -> str:
    return _python("import sys; from s4lib.cli import main; sys.exit(main(['info', *sys.argv[1:]]))"
                   .replace("sys.argv[1:]", repr(list(flags))), env).stdout


def _module_line(out: str, label: str) -> str:
    return next(line for line in out.splitlines() if line.strip().startswith(label))


def test_info_reports_not_tried_failed_and_built(tmp_path, failing_compiler, capsys):
    script, _ = failing_compiler
    if shutil.which("c++") is not None:  # not tried yet: a fresh cache
        out = _info(_env(tmp_path / "fresh"))
        assert "not tried yet" in _module_line(out, "native C++ kernels"), out
        assert "not tried yet" in _module_line(out, _engine().label), out

    cache = tmp_path / "cache"  # failed: the reason and the log's path; --verbose prints the log
    _report(_env(cache, str(script)))
    out = _info(_env(cache, str(script)))
    line = _module_line(out, "native C++ kernels")
    assert "FAILED" in line and "this compiler always fails" in line, out
    log = re.search(r"log: (\S+build\.log)", out).group(1)
    assert os.path.isfile(log) and log.startswith(str(cache))
    assert "not tried yet" in _module_line(out, _engine().label)
    verbose = _info(_env(cache, str(script)), "--verbose")
    assert verbose.count("error: this compiler always fails") >= 1 and "-----" in verbose

    if native_build.compiler_path() is None:  # built: the suite's own cache
        skip_unless_ci(f"no C++ compiler ({native_build.compiler()!r})")
    from s4lib.cli import main

    assert main(["build-kernels"]) == 0
    assert "ok in" in capsys.readouterr().out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "built, loads" in _module_line(out, "native C++ kernels"), out
    assert "built, loads" in _module_line(out, _engine().label), out
    assert "native" in out and "chunked" in out


# ------------------------------------------------------------------------------------ trusted caches


def _planted_library(tmp_path: Path) -> tuple[Path, Path]:
    """A shared library whose constructor writes a marker file: (library, marker)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        skip_unless_ci("no C compiler to build the planted library with")
    marker = tmp_path / "planted-library-ran"
    src = tmp_path / "planted.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                   f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    library = tmp_path / "planted.so"
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(library)], check=True)
    return library, marker


def _kernels_dir_name(env: dict) -> str:
    code = "from s4lib.ops import native_build as nb; print(nb.build_dir(nb.KERNELS_MODULE).name)"
    return _python(code, env).stdout.strip().splitlines()[-1]


LOAD_SCRIPT = textwrap.dedent("""
    import json, warnings
    from s4lib.ops import native_build as nb
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            nb.load()
            error = None
        except RuntimeError as e:
            error = str(e)
    print(json.dumps({"error": error, "warnings": [str(w.message) for w in caught]}))
""")


@pytest.mark.parametrize("case", ["hash does not match", "cache writable by others"])
def test_a_planted_library_is_never_loaded(tmp_path, failing_compiler, case):
    """A library in the cache runs code when loaded: one whose sha256 does not match the record,
    or one in a folder others can write to, is refused (and the build redone elsewhere)."""
    script, _ = failing_compiler
    library, marker = _planted_library(tmp_path)
    cache = tmp_path / "cache"
    env = _env(cache, str(script))
    target = cache / _kernels_dir_name(env)
    target.mkdir(parents=True, exist_ok=True)
    planted = target / f"{native_build.KERNELS}.so"
    shutil.copy(library, planted)
    if case == "hash does not match":
        (target / (planted.name + ".sha256")).write_text("0" * 64 + f"  {planted.name}\n")
    else:
        native_cache.record_hash(planted)  # even a matching record does not make the folder trusted
        cache.chmod(0o777)
    result = json.loads(_python(LOAD_SCRIPT, env).stdout.strip().splitlines()[-1])
    assert not marker.exists(), "the planted library was loaded"
    assert result["error"] is not None and "this compiler always fails" in result["error"]
    if case == "hash does not match":
        assert any("does not match its recorded sha256" in w for w in result["warnings"]), result
        assert not planted.exists()  # the rebuild started from a clean folder
    else:
        assert any("not loading compiled kernels from" in w and "writable by others" in w
                   for w in result["warnings"]), result
        assert planted.exists()  # left alone: the private folder was used instead


def test_cache_folders_are_private_and_libraries_carry_their_hash(tmp_path, failing_compiler):
    script, _ = failing_compiler
    cache = tmp_path / "deep" / "cache"
    _report(_env(cache, str(script)))
    folders = [cache, *[p for p in cache.iterdir() if p.is_dir()]]
    assert len(folders) >= 2
    for folder in folders:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    if native_build.is_loaded():  # this process's build of the kernels, in the suite's cache
        library = Path(native_build.last_build()["path"])
        assert native_cache.verified(library) is None
        assert (library.parent / (library.name + ".sha256")).read_text().split()[0] == \
            native_cache.sha256_of(library)


def test_keops_build_folder_is_trusted_and_never_a_fixed_tmp_path(tmp_path):
    try:
        import pykeops  # noqa: F401
    except ImportError:
        skip_unless_ci("pykeops not installed")
    shared = tmp_path / "shared-keops"
    shared.mkdir()
    shared.chmod(0o777)
    cache = tmp_path / "cache"
    code = textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from s4lib.ops import keops
            print(keops._pykeops().get_build_folder())
        print(" | ".join(str(w.message) for w in caught))
    """)
    out = _python(code, _env(cache, KEOPS_CACHE_FOLDER=str(shared))).stdout.strip().splitlines()
    assert out[-2].startswith(str(cache)), out
    assert "not using the KeOps cache folder" in out[-1]
    assert not list(shared.iterdir())


# ------------------------------------------------------------------------------------ fresh build


def test_every_native_module_builds_and_matches_its_oracle():
    """Builds every declared native module with the torch under test and checks it: the kernels
    against the float64 oracle, the fused step engine against the eager step. With
    S4LIB_TEST_FRESH_BUILD=1 (CI, with an empty S4LIB_CACHE) each must have been compiled during this
    test run, not loaded from an older cache."""
    if native_build.compiler_path() is None:
        skip_unless_ci(f"no C++ compiler ({native_build.compiler()!r})")
    from s4lib.cli import _native_modules

    modules = {m.name: m for m in _native_modules()}
    assert native_build.KERNELS in modules and "sashimi_step_cpu" in modules, list(modules)
    for module in modules.values():
        native_build.build(module)  # raises (fails, never skips) if the build fails
        if os.environ.get("S4LIB_TEST_FRESH_BUILD") == "1":  # compiled in this test run (here or in a child)
            library = Path(native_build.last_build(module)["path"])
            assert library.stat().st_mtime >= COLLECTED_AT - 1, f"{library} comes from an older cache"

    import s4lib.ops.native  # noqa: F401  (registers the s4lib::* ops)

    torch.manual_seed(0)
    v, w = torch.randn(3, 8, dtype=torch.cdouble), torch.randn(3, 8, dtype=torch.cdouble)
    z = torch.randn(64, dtype=torch.cdouble)
    x = torch.complex(-torch.rand(3, 8, dtype=torch.double), torch.randn(3, 8, dtype=torch.double))
    for dtype, tol in ((torch.cfloat, 1e-4), (torch.cdouble, 1e-10)):
        r = torch.ops.s4lib.cauchy(v.to(dtype), z.to(dtype), w.to(dtype))
        K = torch.ops.s4lib.log_vandermonde(v.to(dtype), x.to(dtype), 50)
        ref_r, ref_K = cauchy_ref(v, z, w), log_vandermonde_ref(v, x, 50)
        assert (r.cdouble() - ref_r).abs().max() <= tol * ref_r.abs().max()
        assert (K.double() - ref_K).abs().max() <= tol * ref_K.abs().max()

    from sashimi import build_model

    FastStepper = _fast_step().FastStepper
    torch.manual_seed(0)
    model = build_model("tiny", d_model=16, n_layers=1, d_state=4, backend="naive").eval()
    model.setup_step()
    stepper = FastStepper(model, 2)
    state = model.default_state(2)
    tokens = torch.tensor([3, 200])
    with torch.no_grad():
        for _ in range(64):
            eager, state = model.step(tokens, state)
            fast = stepper.step(tokens)
            assert (fast - eager).abs().max() <= 1e-4 * eager.abs().max()
            tokens = eager.argmax(-1)


GENERATE_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    import torch
    from sashimi import Generator, build_model
    from sashimi.pipelines.report import write_report
    torch.manual_seed(0)
    model = build_model("tiny", d_model=16, n_layers=1, d_state=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generator = Generator(model, batch_size=1)
    result = generator.generate(1, n_steps=64)
    paths = write_report(sys.argv[1], result)
    print(json.dumps({"path": generator.path, "reason": generator.fast_reason,
                      "warnings": [str(w.message) for w in caught if "eager step loop" in str(w.message)],
                      "json": open(paths["json"]).read(), "page": open(paths["index"]).read()}))
""")


def test_fused_engine_fallback_is_one_line_everywhere(tmp_path, failing_compiler):
    """A failed fused-engine build: generation runs the eager loop, and the terminal, samples.json and
    the listening page get the same one line (which path, why, the log command), not the compiler output."""
    script, _ = failing_compiler
    out = subprocess.run([sys.executable, "-c", GENERATE_SCRIPT, str(tmp_path / "samples")],
                         env=_env(tmp_path / "cache", str(script)), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    reason = report["reason"]
    assert report["path"] == "eager"
    assert f"{_engine().label} build failed: this compiler always fails" in reason, reason
    assert reason.endswith(native_build.LOG_COMMAND) and "\n" not in reason and len(reason) < 160
    assert report["warnings"] == [f"sashimi: using the eager step loop: {reason}"]
    assert json.loads(report["json"])["settings"]["fast_path_unavailable_reason"] == reason
    assert "kernel.cpp:1:1" not in report["json"] + report["page"]  # no compiler output
