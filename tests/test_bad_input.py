"""Every bad value is refused before any work: exit code 2, one line naming the option, no traceback,
no Ray started, nothing written — and nothing hangs (each case runs under a short timeout)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = "timm:deit_tiny_patch16_224"


def _cli(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitdecomp.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, "RAY_ADDRESS": ""})


def _assert_refused(r: subprocess.CompletedProcess, option: str, out: Path) -> None:
    text = r.stdout + r.stderr
    assert r.returncode == 2, text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and option in errors[0], text[-2000:]
    assert "Started a local Ray instance" not in text and "ray.init" not in text
    assert not out.exists(), f"{out} was written by a refused run"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs for the bad-value cases: images, a store-less folder, bad files of every kind."""
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("bad")
    (d / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(d / "imgs" / "a.png")
    save_file({"blocks.0.norm1.weight": torch.zeros(7)}, str(d / "wrong.safetensors"))
    (d / "garbage.safetensors").write_bytes(b"\xff" * 64)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(d / "pwned"),))

    torch.save({"model": Evil()}, str(d / "pickle.pt"))
    (d / "empty.txt").write_text("\n\n")
    (d / "props.yaml").write_text("- just\n- a list\n")
    (d / "broken.yaml").write_text("a: [unclosed\n")
    (d / "unknown.yaml").write_text("batchsize: 8\n")
    return d


DECOMPOSE = [
    (["--num-cpus", "0"], "--num-cpus"), (["--batch-size", "0"], "--batch-size"),
    (["--concurrency", "-1"], "--concurrency"), (["--commit-every", "0"], "--commit-every"),
    (["--limit", "-1"], "--limit"), (["--limit", "abc"], "--limit"), (["--device", "bogus"], "--device"),
    (["--convention", "bogus"], "--convention"), (["--format", "csv"], "--format"), (["--dtype", "fp8"], "--dtype"),
    (["--source", "bogus"], "--source"), (["--blocks", "seven"], "--blocks"), (["--seed", "x"], "--seed"),
    (["--worker-resources", '{"GPU": 1}'], "--worker-resources"), (["--decode-resources", "{x: 1}"], "--decode-resources"),
    (["--worker-resources", '{"pool": -1}'], "--worker-resources"), (["--max-pixels", "0"], "--max-pixels"),
    (["--alpha-background", "notacolour"], "--alpha-background"),
    (["--pretrained", "fb_in1k", "--checkpoint", "{d}/wrong.safetensors"], "--checkpoint"),
    (["--config", "{d}/missing.yaml"], "--config"), (["--config", "{d}/broken.yaml"], "--config"),
    (["--config", "{d}/unknown.yaml"], "--config"),
]
DECOMPOSE_MODEL = [        # these need the model's architecture (torch/timm loaded): a few seconds each
    (["--model", "timm:not_a_model"], "unknown timm model"), (["--model", "bogus"], "model name"),
    (["--checkpoint", "{d}/wrong.safetensors"], "--checkpoint"), (["--checkpoint", "{d}/pickle.pt"], "--checkpoint"),
    (["--checkpoint", "{d}/garbage.safetensors"], "--checkpoint"), (["--teacher", MODEL], "--teacher"),
]


@pytest.mark.parametrize("extra,option", DECOMPOSE, ids=[" ".join(c[0]) for c in DECOMPOSE])
def test_decompose_refuses_bad_values_before_work(files, tmp_path, extra, option):
    out = tmp_path / "store"
    args = ["decompose", "--input", str(files / "imgs"), "--output", str(out), "--model", MODEL]
    _assert_refused(_cli(args + [a.replace("{d}", str(files)) for a in extra], timeout=60), option, out)


@pytest.mark.parametrize("extra,option", DECOMPOSE_MODEL, ids=[" ".join(c[0]) for c in DECOMPOSE_MODEL])
def test_decompose_refuses_bad_models_and_checkpoints_before_work(files, tmp_path, extra, option):
    out = tmp_path / "store"
    args = ["decompose", "--input", str(files / "imgs"), "--output", str(out)]
    if "--model" not in extra:
        args += ["--model", MODEL]
    r = _cli(args + [a.replace("{d}", str(files)) for a in extra], timeout=120)
    _assert_refused(r, option, out)
    assert not (files / "pwned").exists()                      # the pickle was never executed
    if "pickle.pt" in " ".join(extra):
        assert "convert it to safetensors" in r.stderr and "save_file" in r.stderr


FIT = [
    (["compalign", "--lam", "abc"], "--lam"), (["compalign", "--val-fraction", "abc"], "--val-fraction"),
    (["compalign", "--val-fraction", "1.5"], "--val-fraction"), (["compalign", "--max-epochs", "0"], "--max-epochs"),
    (["compalign", "--lr", "0"], "--lr"), (["compalign", "--batch-size", "-2"], "--batch-size"),
    (["textspan", "--texts-per-head", "0"], "--texts-per-head"), (["textspan", "--rank", "-1"], "--rank"),
    (["textspan", "--last-layers", "0"], "--last-layers"), (["textspan", "--pool", "{d}/missing.txt"], "--pool"),
    (["textspan", "--pool", "{d}/empty.txt"], "--pool"), (["probe", "--l2", "-1", "--label-column", "y"], "--l2"),
    (["probe", "--max-rows", "0", "--label-column", "y"], "--max-rows"),
]


@pytest.mark.parametrize("extra,option", FIT, ids=[" ".join(c[0]) for c in FIT])
def test_fit_refuses_bad_values_before_work(files, tmp_path, extra, option):
    out = tmp_path / "fit"
    args = ["fit", extra[0], "--store", str(files / "nostore"), "--out", str(out)]
    _assert_refused(_cli(args + [a.replace("{d}", str(files)) for a in extra[1:]], timeout=60), option, out)


QUERY = [
    (["ablate", "--order", "bogus", "--label-column", "y"], "--order"),
    (["ablate", "--kinds", "all", "heads", "--label-column", "y"], "--kinds"),
    (["ablate", "--head", "svm", "--label-column", "y"], "--head"),
    (["retrieve", "--property", "color", "--text", "red", "--top-components", "-1"], "--top-components"),
    (["retrieve", "--property", "color", "--text", "red", "--top-images", "0"], "--top-images"),
    (["retrieve", "--property", "color", "--text", "red", "--index", "faiss"], "--index"),
    (["mitigate", "--label-column", "y", "--k", "0"], "--k"),
    (["mitigate", "--label-column", "y", "--protocol", "same"], "--protocol"),
    (["mitigate", "--label-column", "y", "--ranking", "random"], "--ranking"),
    (["mitigate", "--label-column", "y", "--val-fraction", "2"], "--val-fraction"),
    (["mitigate", "--label-column", "y", "--name", "../x"], "--name"),
    (["heatmap", "--components", "blocks.0.attn", "--top-n", "0"], "--top-n"),
    (["heatmap", "--components", "blocks.0.attn", "--device", "gpu"], "--device"),
    (["compattribute", "--properties", "{d}/missing.yaml"], "--properties"),
    (["compattribute", "--properties", "{d}/props.yaml"], "--properties"),
    (["compattribute", "--properties", "{d}/broken.yaml"], "--properties"),
]


@pytest.mark.parametrize("extra,option", QUERY, ids=[" ".join(c[0]) for c in QUERY])
def test_query_refuses_bad_values_before_work(files, tmp_path, extra, option):
    out = tmp_path / "q"
    args = ["query", extra[0], "--store", str(files / "nostore"), "--out", str(out)]
    _assert_refused(_cli(args + [a.replace("{d}", str(files)) for a in extra[1:]], timeout=60), option, out)


def test_a_missing_store_is_one_line(files, tmp_path):
    r = _cli(["query", "compattribute", "--store", str(files / "nostore"), "--out", str(tmp_path / "q")], timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no store at" in r.stderr
    assert not (tmp_path / "q").exists()


def test_only_errors_that_can_go_away_are_retried():
    import errno

    from vitdecomp.io import retry, transient
    from vitdecomp.pipeline.job import _permanent_io_error

    calls = []

    def fails(exc):
        def fn():
            calls.append(1)
            raise exc
        return fn

    for exc in (OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EROFS, "Read-only file system"),
                PermissionError(errno.EACCES, "Permission denied"), ValueError("bad value"),
                OSError("LanceError(IO): failed to write: No space left on device (os error 28)")):
        calls.clear()
        with pytest.raises(type(exc)):
            retry(fails(exc), "write", attempts=4, first_delay=0.001)
        assert len(calls) == 1 and not transient(exc), exc
    for exc in (ConnectionError("reset"), OSError("AWS Error NETWORK_CONNECTION during PutObject"),
                RuntimeError("Retryable commit conflict for version 7")):
        calls.clear()
        with pytest.raises(type(exc)):
            retry(fails(exc), "write", attempts=3, first_delay=0.001)
        assert len(calls) == 3 and transient(exc), exc
    # a disk-full error deep inside a wrapped task error is found (and becomes one line in the job)
    inner = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("UDF failed to process a data block") from e
    except RuntimeError as outer:
        assert _permanent_io_error(outer) is inner
    assert _permanent_io_error(RuntimeError("x")) is None
    assert _permanent_io_error(ConnectionError(errno.ECONNRESET, "reset")) is None


def test_mask_ids_cannot_leave_the_masks_directory(tmp_path):
    from vitdecomp.errors import InputError
    from vitdecomp.query.heatmaps import find_mask_file

    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    assert find_mask_file(str(tmp_path / "masks"), "a") == str((tmp_path / "masks" / "a.png").resolve())
    for bad in ("../secret", "../secret.png", str(tmp_path / "secret"), "sub/../../secret"):
        with pytest.raises(InputError, match="outside the masks directory"):
            find_mask_file(str(tmp_path / "masks"), bad)


def test_cpu_plan_leaves_every_stage_a_share_on_small_instances():
    from vitdecomp.pipeline.job import cpu_plan

    assert cpu_plan(8, 2) == {"read": None, "decode": 0.5, "actor": 1.0, "write": 0.25}
    assert cpu_plan(1, 4, tight=False)["actor"] == 1.0           # a cluster may scale: Ray's defaults
    for cpus in (0.5, 1, 1.5, 2, 2.5):
        for conc in (1, 2, 3):
            if cpus >= conc + 1:
                continue
            p = cpu_plan(cpus, conc)
            assert all(v > 0 for v in p.values())
            assert conc * p["actor"] + p["decode"] + p["read"] + p["write"] <= cpus + 1e-9, (cpus, conc, p)


@pytest.mark.slow
def test_one_cpu_instance_does_not_hang(tmp_path):
    from jobutil import make_images

    make_images(tmp_path / "imgs", n=6, corrupt=False)
    r = _cli(["decompose", "--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "s"), "--model", MODEL,
              "--num-cpus", "1", "--batch-size", "4"], timeout=400)
    assert r.returncode == 0 and "6 images written" in r.stdout, (r.stdout + r.stderr)[-3000:]


def test_resources_no_local_node_offers_fail_fast_with_what_it_offers(caplog):
    from vitdecomp.config import DecomposeConfig, OptionError
    from vitdecomp.pipeline.job import _check_resources

    offered = {"CPU": 2.0, "memory": 1e9, "object_store_memory": 1e8, "node:127.0.0.1": 1.0, "decode": 4.0}
    cfg = DecomposeConfig(input="x", output="y", model=MODEL, worker_resources='{"gpu_pool": 1}',
                          decode_resources='{"decode": 1}')
    with pytest.raises(OptionError, match=r"worker_resources: no node .* offers \{'gpu_pool': 1.0\}; it offers "
                                          r"\{'decode': 4.0\} \(CPU 2, GPU 0\)"):
        _check_resources(cfg, offered, fixed=True)
    _check_resources(cfg, offered, fixed=False)                  # a cluster may scale: a warning only
    assert "gpu_pool" in caplog.text
    _check_resources(cfg.replace(worker_resources=None), offered, fixed=True)   # what is offered passes


@pytest.mark.slow
def test_a_run_with_failed_inputs_lists_them_and_how_to_read_them_all(tmp_path):
    from jobutil import BAD, make_images

    make_images(tmp_path / "imgs", n=3, corrupt=True)
    out = tmp_path / "s"
    r = _cli(["decompose", "--input", str(tmp_path / "imgs"), "--output", str(out), "--model", MODEL,
              "--batch-size", "4"], timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "Token authentication is" not in r.stderr            # the CLI sets Ray's auth mode explicitly
    failed = len(BAD) + 1                                      # + the truncated PNG
    assert f"decompose: {failed} inputs failed:" in r.stdout, r.stdout
    listed = [line for line in r.stdout.splitlines() if line.startswith(f"  {tmp_path / 'imgs'}")]
    assert sorted(line.split(": ")[0].strip() for line in listed) == sorted(
        str(tmp_path / "imgs" / k) for k in [*BAD, "bad/truncated.png"]), r.stdout
    for line in listed:                                        # the file and the cause in words, no reprs
        assert "object at 0x" not in line and ("not a supported image format" in line or "empty file" in line
                                               or "truncated" in line), line
    call = r.stdout.split("all of them (every run): ", 1)[1].splitlines()[0]
    assert call.startswith("python -c ")
    shown = subprocess.run(call.replace("python", sys.executable, 1), shell=True, capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert all(k in shown.stdout for k in [*BAD, "bad/truncated.png"]), shown.stdout


@pytest.mark.parametrize("what", ["missing", "empty", "hidden-only"])
def test_a_missing_or_empty_input_fails_before_ray_starts(tmp_path, what):
    src = tmp_path / "in"
    if what != "missing":
        (src / "sub").mkdir(parents=True)
    if what == "hidden-only":
        (src / ".DS_Store").write_bytes(b"x")
    code = ("import ray, sys\nfrom vitdecomp.config import DecomposeConfig\nfrom vitdecomp.errors import InputError\n"
            "from vitdecomp.pipeline import run_decompose\n"
            f"try:\n    run_decompose(DecomposeConfig(input={str(src)!r}, output={str(tmp_path / 'out')!r}, model={MODEL!r}))\n"
            "except InputError as e:\n    print('ERR', e, ray.is_initialized())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "RAY_ADDRESS": ""})
    line = next((x for x in r.stdout.splitlines() if x.startswith("ERR")), r.stdout + r.stderr)
    assert line.endswith(" False"), line                        # Ray never started
    assert ("does not exist" if what == "missing" else "holds no files") in line, line
    assert not (tmp_path / "out").exists()
