"""``moe-lora analyze`` end to end on a small Llama saved as a local model directory (2 layers, hidden 64, the
MiniLM tokenizer: tiny-llama's vocabulary at a fraction of its load time) with a generated JSONL, ``--compare``,
and the HTML page in a real headless browser (skipped when no Chromium is installed)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from analysis_testutils import D, Stack, force_logits, one_expert_logits, zero_logits

from moe_lora import MoELoRAConfig, convert, iter_routed_modules, save_adapter, zoo
from moe_lora.analysis import RoutingRecorder, build_report, read_report, validate_report, write_report_dir
from moe_lora.cli import main
from moe_lora.commands.analyze import read_jsonl

RECORDS = (
    [{"text": f"what is {i} plus {i + 3}? the answer is {2 * i + 3}.", "task": "math"} for i in range(5)]
    + [
        {"prompt": f"write a loop over {n} items", "response": f"for x in range({n}): print(x)", "task": "code"}
        for n in (3, 10, 100)
    ]
    + [
        {
            "text": "an unlabelled record about the weather, which is long enough to be truncated at twenty-four "
            "tokens by the max length option of the command"
        },
        {"text": "short", "label": "code"},
    ]
)
TARGETS = ["q_proj", "up_proj"]
PLOTS = ("load_heatmap.png", "cv_entropy.png", "coactivation.png", "load_by_task.png")


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A local transformers directory: LlamaForCausalLM (2 layers, hidden 64) plus the MiniLM tokenizer."""
    import transformers as tf

    path = tmp_path_factory.mktemp("small-llama")
    config = tf.LlamaConfig(
        vocab_size=30522,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        **zoo.MINILM_SPECIAL_IDS,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tf.LlamaForCausalLM(config).save_pretrained(path)
    zoo.load_tokenizer("minilm").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def analysis_dir(tmp_path_factory, data_file, model_dir) -> Path:
    """One `moe-lora analyze --config` run (q_proj and up_proj of 2 layers, E=4, top-2)."""
    root = tmp_path_factory.mktemp("analyze")
    config = root / "method.yaml"
    MoELoRAConfig(target_modules=TARGETS, num_experts=4, top_k=2, rank=4, router_init_std=1.0).to_yaml(config)
    out = root / "out"
    rc, stdout, stderr = _run_cli(
        [
            "analyze",
            "--model",
            str(model_dir),
            "--config",
            str(config),
            "--data",
            str(data_file),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--max-length",
            "24",
            "--no-progress",
        ]
    )
    assert rc == 0, stderr
    assert "routed layers" in stdout and str(out / "report.json") in stdout
    return out


def test_cli_writes_a_valid_report_with_plots(analysis_dir, data_file, model_dir):
    import matplotlib.image

    for name in ("report.json", "index.html", *PLOTS):
        assert (analysis_dir / name).is_file(), name
    for name in PLOTS:
        img = matplotlib.image.imread(analysis_dir / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, name
    report = json.loads((analysis_dir / "report.json").read_text())
    assert validate_report(report) == []
    assert report["schema_version"] == 1 and report["model"] == str(model_dir) and report["adapter"] is None

    texts, _ = read_jsonl(data_file)
    tokenizer = zoo.load_tokenizer(str(model_dir))
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=24)["input_ids"]]
    assert max(lengths) == 24 and min(lengths) < 10  # truncation and padding both happened
    assert report["num_sequences"] == len(RECORDS)
    assert report["num_tokens"] == sum(lengths)
    assert report["labels"] == ["math", "code"]
    names = [layer["name"] for layer in report["layers"]]
    assert names == [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.up_proj")]
    math_tokens, code_tokens = sum(lengths[:5]), sum(lengths[5:8]) + lengths[9]
    for layer in report["layers"]:
        assert layer["num_tokens"] == sum(lengths)  # padding excluded in every layer
        assert layer["num_experts"] == 4 and layer["top_k"] == 2 and layer["router"] == "topk"
        assert layer["mean_active_experts"] == pytest.approx(2.0)
        assert layer["tokens_by_task"] == {"math": math_tokens, "code": code_tokens}
        assert len(layer["coactivation"]) == 4
    assert report["summary"]["num_layers"] == 4


def test_cli_with_a_saved_adapter_matches_the_in_process_model(tmp_path, data_file, model_dir):
    """save_adapter -> `analyze --adapter` gives the load an in-process recorder measures on the same model."""
    model = zoo.load_model(str(model_dir))
    model = (
        convert(
            model,
            MoELoRAConfig(
                target_modules=["up_proj"], num_experts=4, top_k=1, rank=4, router_init_std=1.0, init_seed=5
            ),
        )
        or model
    )
    with torch.no_grad():  # routers that a fresh conversion would not reproduce: only loading gives them
        for _, module in iter_routed_modules(model):
            module.router.weight.copy_(module.router.weight.flip(0) * 2.0)
    save_adapter(model, tmp_path / "adapter")
    rc, _, stderr = _run_cli(
        [
            "analyze",
            "--model",
            str(model_dir),
            "--adapter",
            str(tmp_path / "adapter"),
            "--data",
            str(data_file),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--no-plots",
        ]
    )
    assert rc == 0, stderr
    report = read_report(tmp_path / "out")
    assert report["adapter"] == str(tmp_path / "adapter")
    tok = zoo.load_tokenizer(str(model_dir))
    texts, _ = read_jsonl(data_file)
    with RoutingRecorder(model.eval()) as rec, torch.no_grad():
        for text in texts:  # one sequence at a time: no padding at all
            batch = tok([text], truncation=True, max_length=256, return_tensors="pt")
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    direct = rec.metrics()
    assert [layer["name"] for layer in report["layers"]] == list(direct)
    for layer in report["layers"]:
        N = direct[layer["name"]]["num_tokens"]
        assert layer["num_tokens"] == N == report["num_tokens"]
        # batched with padding vs one sequence at a time: allow one token whose near-tie routing flips
        assert layer["load"] == pytest.approx(direct[layer["name"]]["load"], abs=1.01 / N)


def _stack_report(path: Path, collapse: bool, extra_layer: bool = False) -> Path:
    E = 4
    model = Stack([("topk", E, 1), ("soft", E, 1)] + ([("topk", 2, 1)] if extra_layer else []))
    force_logits(model.layers[0], one_expert_logits(E) if collapse else zero_logits(E))
    force_logits(model.layers[1], zero_logits(E))
    if not collapse:  # uniform p, top-1: ties go to expert 0 in torch.topk; spread tokens instead
        model.layers[0].router.logits = lambda x: (
            torch.nn.functional.one_hot(torch.arange(x.shape[0]) % E, E).float() * 1e4
        )
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(torch.randn(2, 8, D))
    report = build_report(
        list(rec.metrics().values()), model="stack", adapter=None, data=None, num_sequences=2, num_tokens=16, labels=[]
    )
    write_report_dir(report, path, plots=False)
    return path / "report.json"


def test_cli_compare(tmp_path):
    a = _stack_report(tmp_path / "a", collapse=True)
    b = _stack_report(tmp_path / "b", collapse=False, extra_layer=True)
    rc, stdout, stderr = _run_cli(["analyze", "--compare", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert rc == 0, stderr
    rows = {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.startswith("layers.")}
    assert rows["layers.0"][:2] == [f"{math.sqrt(3):.4f}", "0.0000"]  # CV A, CV B
    assert rows["layers.0"][-2:] == ["3", "0"]  # dead experts A, B
    assert rows["layers.1"][:2] == ["0.0000", "0.0000"]
    assert rows["layers.2"][0] == "-" and rows["layers.2"][-1] == "0"  # only in B
    assert re.search(r"dead experts\s+A\s+3\s+B\s+0", stdout)
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "cmp" / "compare.png").shape[0] > 100


def test_cli_errors_are_reported_without_traceback(tmp_path, data_file):
    rc, _, err = _run_cli(["analyze", "--model", "tiny-llama", "--data", str(data_file), "--out", str(tmp_path)])
    assert rc == 2 and "--adapter or --config: required" in err
    rc, _, err = _run_cli(
        [
            "analyze",
            "--data",
            "nope.jsonl",
            "--config",
            "x.yaml",
            "--out",
            str(data_file),
            "--batch-size",
            "0",
            "--device",
            "tpu",
        ]
    )
    assert rc == 2 and "invalid command line (6 problems)" in err, err  # every problem at once
    for problem in (
        "--model: required",
        "--data: file 'nope.jsonl' does not exist",
        "--out: ",
        "is not a directory",
        "--config: file 'x.yaml' does not exist",
        "--batch-size: 0 must be >= 1",
        "--device: 'tpu'",
    ):
        assert problem in err, (problem, err)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    config = tmp_path / "c.yaml"
    MoELoRAConfig(target_modules=TARGETS).to_yaml(config)
    rc, _, err = _run_cli(
        ["analyze", "--model", "tiny-llama", "--config", str(config), "--data", str(bad), "--out", str(tmp_path / "o")]
    )
    assert rc == 2 and "bad.jsonl line 2 has no string 'text'" in err
    config.write_text("num_experts: 4\n  top_k: [2\n")
    rc, _, err = _run_cli(
        [
            "analyze",
            "--model",
            "tiny-llama",
            "--config",
            str(config),
            "--data",
            str(data_file),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "--config: " in err and "is not valid YAML at line 2" in err, err
    (tmp_path / "r.json").write_text(json.dumps({"schema_version": 99}))
    rc, _, err = _run_cli(["analyze", "--compare", str(tmp_path / "r.json"), str(tmp_path / "r.json")])
    assert rc == 2 and "schema_version" in err


# ---- the page in a real browser -------------------------------------------------------------------------------
class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href") and value is not None:
                self.refs.append((tag, value))


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _load_in_browser(browser: str, page: Path, profile: Path) -> tuple[str, list[str]]:
    """(DOM after the load event, console messages) of ``page`` in headless Chromium."""
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def test_index_html_in_headless_browser(analysis_dir, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium/Chrome installed (Debian: apt-get install chromium)")
    html_text = (analysis_dir / "index.html").read_text()
    parser = _Refs()
    parser.feed(html_text)
    imgs = [v for tag, v in parser.refs if tag == "img"]
    assert sorted(imgs) == sorted(PLOTS)
    for _, ref in parser.refs:  # self-contained: relative paths to files of the directory, nothing external
        assert "://" not in ref and not ref.startswith(("/", "//")), ref
        assert (analysis_dir / ref).is_file(), ref

    dom, console = _load_in_browser(browser, analysis_dir / "index.html", tmp_path / "profile1")
    assert console == []
    assert re.search(rf'data-images-ok="{len(PLOTS)}"', dom), dom[:500]
    assert 'data-images-broken="0"' in dom
    assert dom.count('data-status="ok"') == len(PLOTS)
    assert "model.layers.0.self_attn.q_proj" in dom and "max_cv_layer" in dom

    broken = tmp_path / "copy"
    shutil.copytree(analysis_dir, broken)
    (broken / "coactivation.png").write_bytes(b"not a png")
    (broken / "cv_entropy.png").unlink()
    dom, _ = _load_in_browser(browser, broken / "index.html", tmp_path / "profile2")
    assert 'data-images-broken="2"' in dom and f'data-images-ok="{len(PLOTS) - 2}"' in dom
    assert "plot file missing or unreadable: cv_entropy.png" in dom
