"""One S3 configuration everywhere: with ``AWS_ENDPOINT_URL`` pointing at a trap listener and
``--s3-endpoint`` at the local S3, no request of any job goes to the trap."""
from __future__ import annotations

import socket
import subprocess
import threading

import pytest

from jobutil import MotoS3, free_port, make_images, run_cli


class Trap:
    """A TCP listener on 127.0.0.1 that records every connection it gets (and answers nothing)."""

    def __init__(self):
        self.port = free_port()
        self.hits = 0
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", self.port))
        self.srv.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.hits += 1
            conn.close()

    def close(self):
        self.srv.close()


@pytest.mark.slow
def test_every_job_uses_the_given_s3_endpoint_never_the_environment_one(tmp_path, monkeypatch):
    """The decompose job runs as a subprocess (its Ray workers inherit the trap in their environment);
    retrieve (contact sheet, Lance index, report) and TextSpan run in this process with the same
    environment."""
    from vitdecomp.config import RetrieveConfig, TextSpanConfig
    from vitdecomp.fit.jobs import run_textspan
    from vitdecomp.query.jobs import run_retrieve

    s3 = MotoS3()
    trap = Trap()
    try:
        c = s3.client()
        for b in ("corpus", "stores", "outputs"):
            c.create_bucket(Bucket=b)
        valid = make_images(tmp_path / "imgs", n=6, corrupt=False)
        for rel, data in valid.items():
            c.put_object(Bucket="corpus", Key=f"imgs/{rel}", Body=data)
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{trap.port}", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{trap.port}"}
        p = run_cli(["decompose.py", "--input", "s3://corpus/imgs", "--output", "s3://stores/clip", "--model",
                     "open_clip:vitdecomp-toy-clip", "--batch-size", "4", "--num-cpus", "2",
                     "--s3-endpoint", s3.endpoint], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        common = dict(store="s3://stores/clip", s3_endpoint=s3.endpoint, cache_dir=str(tmp_path / "cache"))
        r = run_retrieve(RetrieveConfig(out="s3://outputs/q", property="color", text="red color", top_images=4,
                                        **common))
        assert not r["unreadable_tiles"]
        r = run_retrieve(RetrieveConfig(out="s3://outputs/qi", property="color", image_ids=[sorted(valid)[0]],
                                        index="lance", top_images=3, **common))
        run_textspan(TextSpanConfig(out="s3://outputs/ts", texts_per_head=2, rank=8, last_layers=1,
                                    distributed=False, **common))
        keys = {o["Key"] for o in c.list_objects_v2(Bucket="outputs").get("Contents", [])}
        assert {"q/retrieval.parquet", "q/retrieval.png", "q/report.html", "qi/retrieval.parquet",
                "ts/textspan.parquet"} <= keys, keys
        assert trap.hits == 0, f"{trap.hits} connections went to the endpoint from the environment"
    finally:
        trap.close()
        s3.close()
