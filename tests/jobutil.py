"""Helpers for job tests: generated image corpora, a local S3 (moto) behind a stoppable forwarder."""
from __future__ import annotations

import functools
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

import vitdecomp.toyworld  # noqa: F401,E402  (registers the toy world's architectures, used by write_store)

BAD = {"bad/not_image.jpg": b"this is not an image", "bad/empty.png": b"", "notes.txt": b"hello"}


def make_images(root: Path, n: int = 12, seed: int = 0, corrupt: bool = True) -> dict[str, bytes]:
    """``n`` valid images in two class folders (+ corrupt files); returns id → bytes of the valid ones."""
    rng = np.random.default_rng(seed)
    valid = {}
    for i in range(n):
        label = "red" if i % 2 == 0 else "blue"
        arr = rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG" if i % 3 else "JPEG")
        rel = f"{label}/img{i:03d}.{'png' if i % 3 else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(buf.getvalue())
        valid[rel] = buf.getvalue()
    if corrupt:
        for rel, data in BAD.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        first = next(iter(valid.values()))
        (root / "bad/truncated.png").write_bytes(first[: len(first) // 2] if first[:4] == b"\x89PNG" else
                                                 valid[[k for k in valid if k.endswith(".png")][0]][:200])
    return valid


def make_shards(root: Path, images: dict[str, bytes], per_shard: int = 5) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    items = sorted(images.items())
    shards = []
    for s in range(0, len(items), per_shard):
        path = root / f"shard-{s // per_shard:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for rel, data in items[s:s + per_shard]:
                key = rel.rsplit(".", 1)[0].replace("/", "_")
                ext = rel.rsplit(".", 1)[1]
                for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", rel.split("/")[0].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append(path)
    return shards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Forwarder:
    """A TCP forwarder 127.0.0.1:port → target that can be stopped (an outage) and restarted."""

    def __init__(self, target_port: int):
        self.port, self.target = free_port(), target_port
        self._srv = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self):
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(100):                 # the old listener may take a moment to go away
            try:
                srv.bind(("127.0.0.1", self.port))
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"forwarder could not rebind 127.0.0.1:{self.port}")
        srv.listen(64)
        self._srv = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def stop(self):
        srv, self._srv = self._srv, None
        if srv:
            try:                             # wakes the thread blocked in accept(), releasing the port
                srv.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            srv.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, srv):
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class MotoS3:
    """``moto_server`` on 127.0.0.1 (its own process, stopped by PID) behind a :class:`Forwarder`."""

    def __init__(self):
        self.port = free_port()
        exe = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("moto_server did not start")
        self.forwarder = Forwarder(self.port)
        self.forwarder.start()
        self.endpoint = f"http://127.0.0.1:{self.forwarder.port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.port}", region_name="us-east-1")

    def close(self):
        self.forwarder.stop()
        self.proc.kill()
        self.proc.wait()


def run_cli(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, str(root / "jobs" / args[0]), *args[1:]], cwd=root,
                            env={**os.environ, **(env or {})}, **kw)


def synthetic_components(blocks: int = 3, heads: int = 2):
    """``embed``, per block ``heads`` heads and an MLP, ``bias`` — a ViT-like component list."""
    from vitdecomp.engine.names import Component

    comps = [Component("embed", "embed", "")]
    for b in range(blocks):
        comps += [Component(f"blocks.{b}.attn.head.{h}", "head", f"blocks.{b}.attn", b, h) for h in range(heads)]
        comps.append(Component(f"blocks.{b}.mlp", "mlp", f"blocks.{b}.mlp", b))
    return comps + [Component("bias", "bias", "")]


@functools.lru_cache(maxsize=None)
def _model(name: str):
    """The architecture (no weights) whose name, readout and preprocessing planted stores record."""
    import vitdecomp as vd

    return vd.load_model(name, load_weights=False)


def write_store(path, contributions: np.ndarray, components, columns: dict | None = None, ids=None,
                model: str = "open_clip:vitdecomp-toy-clip", space: str = "clip", fmt: str = "parquet") -> str:
    """A store with exactly these contributions ``[n, K, d]`` (readout = their sum) and pass-through
    columns (``uri`` among them is the URI column), written through the Store API — planted truth for
    query tests. The manifest records ``model`` (its name and preprocessing) with a ``d``-dimensional
    readout in ``space``, and the given components (they need not be the model's)."""
    import dataclasses
    from types import SimpleNamespace

    import pyarrow as pa

    from vitdecomp.config import DecomposeOptions
    from vitdecomp.store import Manifest, Store

    n, K, d = contributions.shape
    assert K == len(components)
    ids = ids or [f"img{i:05d}" for i in range(n)]
    columns = dict(columns or {})
    uris = columns.pop("uri", None) or [f"/nonexistent/{i}.png" for i in ids]
    extra = pa.table(columns) if columns else pa.table({})
    m = Manifest.build(_model(model), components, DecomposeOptions(dtype="fp32"), format=fmt,
                       passthrough=extra.schema, source_kind="planted")
    m = dataclasses.replace(m, d=d, model=dataclasses.replace(m.model, readout={**m.model.readout, "dim": d,
                                                                                  "space": space}))
    st = Store.create(str(path), m)
    chunk = SimpleNamespace(names=[c.name for c in components], contributions=contributions,
                            readout=contributions.sum(1))
    st.append(chunk, ids, columns={c: extra.column(c) for c in extra.column_names}, uris=uris)
    return str(path)
