"""The documentation cannot rot.

- `docs/tutorial.md`: every command runs, in order, in a fresh directory, and exits 0; a few
  key outputs appear. Console blocks hold commands after `$ ` (heredocs and trailing `\\`
  continue a command); a Python block whose first line is `# file: NAME` is written to NAME
  (a later `$ python NAME` runs it); any other Python block runs as a script. The fast test
  runs `tcc ...` and `python FILE` commands in this process (`tcc.cli.main`, `runpy`: torch is
  imported once, not per command) and everything else in bash; the slow one runs every command
  in bash with the repository's `.venv/bin` first on `PATH`, exactly as a reader would.
- `docs/ir.md` and `docs/isa.md` equal what `docs/generate.py` (a developer tool, outside the
  package) generates from the op table and the ISA; `--check` names a stale file.
- The how-tos' code blocks run against the code they describe.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import importlib.util

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load_generator():
    """docs/generate.py, the references' generator: a script of the repository, not a tcc module."""
    spec = importlib.util.spec_from_file_location("tcc_docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


docs = _load_generator()
BIN = ROOT / ".venv" / "bin"

# key outputs of the tutorial: a substring of a command -> what its output must contain
EXPECTED = {
    "python make_bert.py": ["saved bert.pt2"],
    "--target cpu -o bert-fp32": ["for cpu"],
    "tcc targets": ["fpga-small", "edge-cpu"],
    "--target fpga-small --pipeline": ["~hp(8, 8, 2)", "int-nonlinear: changed", "accelerator: 11 sections"],
    "tcc inspect bert-fpga": ["hp(8, 8, 2)"],
    "--on sim --stats stats.json": ["cycles"],
    "python compare.py": ["ISA simulator == numpy reference, bit for bit"],
    "tcc eval bert-fpga": ["max abs error"],
    "ls bert-fpga/report.html": ["bert-fpga/report.html"],
    "python make_digits.py": ["saved digits.pt2"],
    "--lc 25ms": ["edge-cpu ($35) is the cheapest device meeting"],
    "--lc 9ms": ["edge-cpu ($35) is the cheapest device meeting", "hp75-8x8-int8 runs in"],
    "ls selection": ["pareto.png", "report.html", "selection.json"],
    "--target auto": ["chose edge-cpu", "for edge-cpu"],
}


# ---------------------------------------------------------------------------------------------
# reading the tutorial

@dataclass(frozen=True)
class Step:
    kind: str  # "shell" (a console command), "file" (write `name`), "python" (run a block)
    text: str
    name: str = ""
    line: int = 0  # in the markdown file

    def __str__(self) -> str:
        where = f"line {self.line}"
        return f"{where}: $ {self.text}" if self.kind == "shell" else f"{where}: {self.kind} {self.name}".rstrip()


_FENCE = re.compile(r"^```(\w*)\s*$")
_HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line of the body's first line) of every fenced block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        blocks.append((m[1], "\n".join(body) + "\n", start + 1))
        i += 1
    return blocks


def tutorial_steps(text: str) -> list[Step]:
    steps = []
    for lang, body, line in fenced_blocks(text):
        if lang == "python":
            first = body.splitlines()[0]
            m = re.match(r"#\s*file:\s*(\S+)", first)
            steps.append(Step("file", body, m[1], line) if m else Step("python", body, "", line))
        elif lang == "console":
            lines = body.splitlines()
            i = 0
            while i < len(lines):
                if not lines[i].startswith("$ "):
                    i += 1
                    continue
                at, command = line + i, lines[i][2:]
                while command.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command = command[:-1].rstrip() + " " + lines[i].strip()
                heredoc = _HEREDOC.search(command)
                if heredoc:
                    end = heredoc[1]
                    while i + 1 < len(lines) and lines[i] != end:
                        i += 1
                        command += "\n" + lines[i]
                steps.append(Step("shell", command, "", at))
                i += 1
    return steps


def test_tutorial_parses_into_the_steps_it_shows():
    steps = tutorial_steps((DOCS / "tutorial.md").read_text())
    shell = [s.text for s in steps if s.kind == "shell"]
    assert {s.name for s in steps if s.kind == "file"} == {"make_bert.py", "compare.py", "make_digits.py"}
    assert all(any(key in command for command in shell) for key in EXPECTED), \
        [key for key in EXPECTED if not any(key in c for c in shell)]
    assert any(c.startswith("tcc run bert-fpga") and "--on sim" in c for c in shell)
    assert any(c.startswith("tcc select") for c in shell) and any("select-device{" in c for c in shell)


def test_heredocs_and_continuations_are_one_command():
    text = "```console\n$ cat > f.py <<'EOF'\nprint(1)\nEOF\n$ tcc compile m.pt2 \\\n    -o out\nout\n```\n"
    steps = tutorial_steps(text)
    assert [s.text for s in steps] == ["cat > f.py <<'EOF'\nprint(1)\nEOF", "tcc compile m.pt2 -o out"]


# ---------------------------------------------------------------------------------------------
# running it

def _env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONWARNINGS="ignore")


def _bash(command: str, cwd: Path) -> tuple[int, str]:
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=600)
    return done.returncode, done.stdout + done.stderr


_SHELL_SYNTAX = re.compile(r"[|&;<>$`*?(){}\[\]]")


def _in_process(command: str, cwd: Path) -> tuple[int, str] | None:
    """Run `tcc ARGS` (tcc.cli.main) or `python FILE` (runpy) here; None for anything else.
    (Arguments are quoted, so braces inside them are fine; bare shell syntax is not.)"""
    try:
        argv = shlex.split(command, comments=True)
    except ValueError:
        return None
    bare = shlex.split(command, comments=True, posix=False)
    if not argv or any(_SHELL_SYNTAX.search(a) and not a[:1] in "'\"" for a in bare):
        return None
    out = io.StringIO()
    if argv[0] == "tcc":
        from tcc.cli import main
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = main(argv[1:])
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 1
        return code, out.getvalue()
    if argv[0] == "python" and len(argv) == 2 and argv[1].endswith(".py"):
        return _run_python(cwd / argv[1], out)
    return None


def _run_python(path: Path, out: io.StringIO) -> tuple[int, str]:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_path(str(path), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - the step fails, with its traceback
            traceback.print_exc(file=out)
            code = 1
    return code, out.getvalue()


def run_markdown(page: Path, tmp: Path, in_process: bool, expected: dict[str, list[str]]) -> dict[str, str]:
    """Run every step of `page` in `tmp`; returns the output of each command (by its text)."""
    outputs = {}
    for step in tutorial_steps(page.read_text()):
        start = time.perf_counter()
        if step.kind == "file":
            (tmp / step.name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / step.name).write_text(step.text)
            continue
        if step.kind == "python":
            script = tmp / f"_block_{step.line}.py"
            script.write_text(step.text)
            code, output = (_run_python(script, io.StringIO()) if in_process
                            else _bash(f"python {shlex.quote(script.name)}", tmp))
        else:
            result = _in_process(step.text, tmp) if in_process else None
            code, output = result if result is not None else _bash(step.text, tmp)
        assert code == 0, f"{page.name}: {step} exited {code}:\n{output[-4000:]}"
        outputs[step.text] = output
        print(f"{time.perf_counter() - start:6.1f} s  {step}")  # shown when the test fails (or with -s)
    for key, wanted in expected.items():
        matches = [text for text in outputs if key in text]
        assert matches, f"no command of {page.name} contains {key!r}"
        for text in matches:
            for want in wanted:
                assert want in outputs[text], f"$ {text}\n  expected {want!r} in its output:\n{outputs[text][-3000:]}"
    return outputs


def run_tutorial(tmp: Path, in_process: bool) -> dict[str, str]:
    return run_markdown(DOCS / "tutorial.md", tmp, in_process, EXPECTED)


@pytest.fixture
def torch_threads():
    """`tcc select --executor inline` sets torch's thread count in this process: restore it."""
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tutorial(tmp_path, monkeypatch, torch_threads):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", _env()["PATH"])
    outputs = run_tutorial(tmp_path, in_process=True)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["cycles"] > 0 and len(stats["section_cycles"]) == 11
    assert json.loads((tmp_path / "selection" / "selection.json").read_text())["device"] == "edge-cpu"
    assert len(outputs) >= 15


@pytest.mark.slow
def test_tutorial_in_a_shell(tmp_path):
    """The same commands as a reader types them: each in bash, `tcc` from .venv/bin."""
    run_tutorial(tmp_path, in_process=False)


# ---------------------------------------------------------------------------------------------
# the generated references

@pytest.mark.parametrize("name", sorted(docs.GENERATED))
def test_generated_reference_is_up_to_date(name):
    committed = (DOCS / name).read_text(encoding="utf-8")
    assert committed == docs.GENERATED[name](), \
        f"docs/{name} is stale: run `make docs` (.venv/bin/python docs/generate.py)"


def test_check_names_the_stale_file_and_writing_fixes_it(tmp_path, capsys):
    (tmp_path / "isa.md").write_text("old\n")
    assert docs.main(["--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "ir.md: stale" in err and "isa.md: stale" in err
    assert (tmp_path / "isa.md").read_text() == "old\n"  # --check writes nothing
    assert docs.main(["--out", str(tmp_path)]) == 0
    assert docs.main(["--check", "--out", str(tmp_path)]) == 0


def test_generator_runs_as_a_script_from_anywhere(tmp_path):
    """`make docs-check` as the Makefile runs it (and from another directory): exit 0 on the
    committed references."""
    done = subprocess.run([sys.executable, str(DOCS / "generate.py"), "--check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/python docs/generate.py --check" in makefile and "$(BIN)/python docs/generate.py\n" in makefile


def test_references_follow_the_definitions():
    """Every op, encoding, opcode and field is in the generated text, and a change to the
    definitions changes it (no hand-copied tables)."""
    from tcc.backends.accel import isa
    from tcc.ir.encoding import ENCODINGS
    from tcc.ir.ops import OPS
    ir_text, isa_text = docs.ir_reference(), docs.isa_reference()
    assert all(f"### {name}\n" in ir_text for name in OPS)
    assert all(f"`#{kw}" in ir_text for kw in ENCODINGS)
    for op in isa.Opcode:
        assert f"### {op.name.lower()}\n" in isa_text
        for f in isa.FORMATS[op]:
            assert f"| `{f.name}` | {f.lsb} | {f.width} |" in isa_text
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(isa.PASSES, isa.Opcode.VGELU, (2, 9))
        default = isa.passes
        mp.setattr(isa, "passes", lambda config: {**default(config), isa.Opcode.VGELU: (2, 9)})
        assert "| `vgelu` | 2 | 9 |" in docs.isa_reference() and "2 * n + 9" in docs.isa_reference()
        mp.setitem(OPS, "relu", OPS["relu"].__class__("relu", ("input",), {}, OPS["relu"].rule, "max(x, 0), changed"))
        assert "max(x, 0), changed" in docs.ir_reference()


def test_a_field_without_a_meaning_is_an_error():
    from tcc.backends.accel import isa
    with pytest.MonkeyPatch.context() as mp:
        mp.delitem(isa.FIELD_DOCS, "span")
        with pytest.raises(KeyError, match="'span' of spgemm has no entry in isa.FIELD_DOCS"):
            docs.isa_reference()


def test_timing_that_branches_on_a_field_is_refused():
    from tcc.backends.accel import isa
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(isa, "occupancy", lambda op, field, config: 2 if op is isa.Opcode.GEMM and field("k") > 4 else 1)
        with pytest.raises(TypeError, match="branches on the value of 'k'"):
            docs.isa_reference()


# ---------------------------------------------------------------------------------------------
# the how-tos

HOWTO = DOCS / "howto"


def _files(page: Path) -> dict[str, str]:
    """The `# file: NAME` Python blocks of a page, by NAME."""
    return {s.name: s.text for s in tutorial_steps(page.read_text()) if s.kind == "file"}


def test_add_a_pass_code_runs(monkeypatch):
    """The how-to's pass, registered as its step 2 says, passes the how-to's tests and the
    registry's own checks."""
    import types

    from tcc.passes import PASSES
    from tcc.passes.pipeline import describe_passes
    files = _files(HOWTO / "add-a-pass.md")
    module = types.ModuleType("tcc.passes.gelu_approx")
    module.__package__ = "tcc.passes"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(files["passes/gelu_approx.py"], "passes/gelu_approx.py", "exec"), module.__dict__)
    monkeypatch.setitem(PASSES, "gelu-approx", module.GeluApprox)
    tests: dict = {"__name__": "test_gelu_approx"}
    exec(compile(files["tests/test_gelu_approx.py"], "tests/test_gelu_approx.py", "exec"), tests)
    ran = [name for name, fn in tests.items() if name.startswith("test_") and fn() is None]
    assert ran == ["test_golden", "test_idempotent", "test_pipeline_text"]
    (entry,) = [d for d in describe_passes(PASSES) if d["name"] == "gelu-approx"]
    assert entry["options"][0]["help"] and entry["summary"] == module.GeluApprox.summary
    registry = (ROOT / "passes" / "registry.py").read_text()
    assert "PASSES: dict[str, type[Pass]] = {cls.name: cls for cls in (" in registry  # the form step 2 shows


def test_add_a_target_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_markdown(HOWTO / "add-a-target.md", tmp_path, in_process=True, expected={
        "python derive.py": ['"rows": 8', '"nonlinear_unit": true'],
        "tcc targets --targets-file": ["kria-k26", "pi5", "xck26"],
        "--target kria-k26": ["for kria-k26", "accelerator:", "(part xck26)"],
        "tcc run k26 --on sim": ["cycles"],
    })


def test_add_a_target_lists_every_catalog_field():
    from tcc.targets import catalog as targets
    text = (HOWTO / "add-a-target.md").read_text()
    fields = (targets.COMMON_REQUIRED + targets.COMMON_OPTIONAL + ("device", "part", "accel", "synthesis")
              + targets.DEVICE_FIELDS + targets.PART_FIELDS + targets.SYNTHESIS_FIELDS + targets.KINDS
              + tuple(e for executors in targets.EXECUTORS.values() for e in executors)
              + tuple(b for backends in targets.BACKENDS_BY_KIND.values() for b in backends))
    assert [f for f in fields if f"`{f}`" not in text] == []
    from tcc.backends.accel.verilog import FAMILIES
    assert [f for f in FAMILIES if f"`{f}`" not in text] == []


# what the how-tos point at in the code: (file, text that must be in it)
ANCHORS = [
    ("ir/ops.py", "_DEFS = ["), ("ir/ops.py", "def _unary("), ("ir/ops.py", "def _need_float(t: TensorType, what"),
    ("ir/ops.py", "def _tt("), ("ir/ops.py", "def _quantized("), ("ir/reference.py", "REFERENCE: dict[str, Callable"),
    ("runtime/torch_executor.py", "TORCH_KERNELS: dict[str, Callable"),
    ("runtime/torch_executor.py", "_CREATES_TENSORS = {"),
    ("compiler/frontend/converters.py", '"erf": (aten.erf, torch.erf, "method:erf"),'),
    ("compiler/frontend/converters.py", "converts(*_keys)(_unary(_kind))"),
    ("compiler/frontend/converters.py", "@module_converter(nn.ReLU, nn.Tanh, nn.Sigmoid, nn.SiLU)\n"
                                        "def activation_module(cx: Lowerer, m: nn.Module, path: str, x):"),
    ("compiler/frontend/__init__.py", "KEPT_WHOLE = ("), ("ir/analysis.py", "def op_flops("),
    ("ir/analysis.py", '"rsqrt", "erf", "neg"'), ("passes/layers.py", "_ACTIVATIONS = {"),
    ("tests/test_reference_semantics.py", "def test_every_op_has_a_semantics_case"),
    ("tests/test_reference_semantics.py", "def test_reference_torch_and_op_table_cover_the_same_ops"),
    ("tests/test_ir_roundtrip.py", "def _every_op_graph"),
    ("tests/test_ir_roundtrip.py", "def test_every_op_kind_round_trips"),
    ("tests/test_ir_roundtrip.py", 'for kind in ("neg", "relu", "tanh", "sigmoid", "exp", "sqrt", "rsqrt", "erf"):'),
    ("passes/rewrite.py", "    def make(self, like: Op, kind: str"),
    ("passes/rewrite.py", "    def keep(self, op: Op)"),
    ("passes/rewrite.py", "    def finish(self"), ("passes/rewrite.py", "    def alias(self"),
    ("passes/rewrite.py", "    def constant(self, hint"), ("passes/base.py", "def option(default"),
    ("passes/base.py", "    def fail(self, option_name"), ("passes/base.py", "    def note(self"),
    ("passes/base.py", "    def require_torch(self"), ("passes/base.py", "    def dataset(self, *names"),
    ("passes/base.py", "    def progress_bar(self"),
    ("passes/hp_prune.py", "class HPPrune(Pass, LayerOptions, TrainingOptions)"),
    ("passes/options.py", "class Shape2("), ("passes/options.py", "class Ratio("),
    ("passes/options.py", "class Latency("),
    ("tests/test_pipeline.py", "def test_registry_names_match_classes_and_every_option_is_documented"),
    ("tests/test_pipeline.py", "def test_format_parses_back_equal"),
    ("compiler/targets/target.py", "def derive_accel_config("),
    ("compiler/targets/target.py", "def _family_interface("),
    ("compiler/targets/target.py", "MARGIN = 0.8"), ("backends/accel/verilog.py", "FAMILIES"),
    ("tests/test_accel_synth.py", "FPGA_TARGETS = [t for t in load_catalog().values() if t.accel is not None]"),
]


@pytest.mark.parametrize("path, text", ANCHORS, ids=[f"{p}:{t.strip()[:30]}" for p, t in ANCHORS])
def test_what_the_howtos_point_at_exists(path, text):
    assert text in (ROOT / path).read_text(), f"{path} no longer has {text!r}: update docs/howto"


def test_links_and_paths_resolve():
    """Relative links of every page, and the repository paths they name in code spans."""
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: broken link {target}"
        for path in re.findall(r"`((?:compiler|ir|passes|backends|runtime|tests|docs)/[\w./-]+\.(?:py|json|md))`",
                               text):
            if not path.startswith(("passes/gelu_approx", "tests/test_gelu_approx")):
                assert (ROOT / path).exists(), f"{page.relative_to(ROOT)}: no file {path}"
