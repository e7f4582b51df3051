"""Helpers for job tests: generated image corpora, a local S3 (moto) behind a stoppable forwarder."""
from __future__ import annotations

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


def _preprocess(model: str) -> dict:
    import vitdecomp as vd

    return vd.load_model(model, load_weights=False).preprocess


def write_store(path, contributions: np.ndarray, components, columns: dict | None = None, ids=None,
                model: str = "open_clip:vitdecomp-toy-clip", space: str = "clip", fmt: str = "parquet") -> str:
    """A store with exactly these contributions ``[n, K, d]`` (readout = their sum) and pass-through
    columns, written through the Store API — planted truth for query tests."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitdecomp.store import Store, column_for, contributions_schema, vectors_to_arrow
    from vitdecomp.store.manifest import components_to_json

    n, K, d = contributions.shape
    assert K == len(components)
    ids = ids or [f"img{i:05d}" for i in range(n)]
    columns = columns or {}
    uris = columns.pop("uri", None) or [f"/nonexistent/{i}.png" for i in ids]
    extra = pa.table(columns) if columns else pa.table({})
    schema = contributions_schema(components, d, "fp32", extra.schema, None)
    manifest = {"format": fmt, "model": {"name": model, "readout": {"kind": "image_embedding", "pool": "token[0]",
                                                                    "dim": d, "space": space},
                                         "pretrained": None, "checkpoint": None, "checkpoint_sha256": None},
                "teacher": None, "preprocess": _preprocess(model), "teacher_preprocess": None,
                "options": {"blocks": None, "heads": True, "convention": "centered", "normalize": False,
                            "readout_only": False},
                "components": components_to_json(components), "d": d, "dtype": "fp32",
                "passthrough": [f.name for f in extra.schema]}
    st = Store(str(path))
    st.create(manifest, schema)
    data = {"image_id": ids, "uri": uris, **{c: extra.column(c) for c in extra.column_names},
            "readout": vectors_to_arrow(contributions.sum(1), "fp32")}
    for k, c in enumerate(components):
        data[column_for(c.name)] = vectors_to_arrow(contributions[:, k], "fp32")
    table = pa.table(data).cast(schema)
    if fmt == "lance":
        import lance

        lance.write_dataset(table, st.lance_uri("contributions"), mode="append")
    else:
        name = "contributions/synthetic.parquet"
        pq.write_table(table, os.path.join(str(path), name))
        st.commit([{"file": name, "rows": n}], None)
    return str(path)
