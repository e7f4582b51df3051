"""Cluster deployment: the decompose job submitted with ``ray job submit --working-dir .`` to a two-node
Ray cluster on loopback (work pinned to both nodes by custom resources), and lints of the manifests
under infra/ (Dockerfile, KubeRay RayJob, Ray cluster-launcher config, runtime_env)."""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import vitdecomp as vd
from jobutil import BAD, MotoS3, free_port, make_images
from vitdecomp.config import DecomposeConfig
from vitdecomp.config import OptionError
from vitdecomp.store import open_store

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MODEL = "timm:deit_tiny_patch16_224"
N_BAD = len(BAD) + 1                       # + the truncated PNG make_images writes


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


# ----------------------------------------------------------------------------- resources option
def test_resources_option_accepts_json_or_mapping_and_explains_errors():
    def cfg(value, key="worker_resources"):
        return DecomposeConfig(input="x", output="y", model=MODEL, **{key: value})

    assert cfg('{"node_b": 1, "decode": 0.5}').worker_resources == {"node_b": 1.0, "decode": 0.5}
    assert cfg({"gpu_pool": 2}).worker_resources == {"gpu_pool": 2.0}     # from a config file
    assert cfg(None).worker_resources is None and cfg("").worker_resources is None
    with pytest.raises(OptionError, match=r"^decode_resources: .*not a JSON object"):
        cfg("{node_b: 1}", "decode_resources")
    with pytest.raises(OptionError, match="'GPU' is not a custom resource"):
        cfg('{"GPU": 1}')
    with pytest.raises(OptionError, match="must be positive"):
        cfg('{"node_b": -1}')
    with pytest.raises(OptionError, match="expected a mapping"):
        cfg("[1, 2]")
    c = cfg('{"b": 1}')
    assert c.worker_resources == {"b": 1.0} and c.decode_resources is None


# --------------------------------------------------------------------------------- Dockerfile
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (INFRA / "docker" / "Dockerfile").read_text()
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        logical.append(buf.strip())
        buf = ""
    return [(s.split(None, 1)[0].upper(), s.split(None, 1)[1] if " " in s else "") for s in logical]


def test_dockerfile_cuda_base_pinned_install_non_root_no_secrets():
    ins = dockerfile_instructions()
    pins = constraints()
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 1, f"expected one build stage, got FROM {froms}"
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu[\d.]+", froms[0])
    assert m, f"base must be a CUDA runtime image (nvidia/cuda:X.Y.Z-runtime-ubuntuNN.NN), got {froms[0]}"
    cuda_wheels = pins["nvidia-cuda-runtime"].split(".")[:2]            # the CUDA that torch's wheels carry
    assert [m.group(1), m.group(2)] == cuda_wheels, \
        f"CUDA base {m.group(1)}.{m.group(2)} != torch wheels' CUDA {'.'.join(cuda_wheels)} (constraints.txt)"

    # the Python the pins were resolved for (constraints.txt header: "Python 3.11")
    py = re.search(r"Python (\d+\.\d+)", (ROOT / "constraints.txt").read_text().splitlines()[0]).group(1)
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    assert args.get("PYTHON_VERSION") == py, f"ARG PYTHON_VERSION={args.get('PYTHON_VERSION')} but constraints are for {py}"

    # the install step: pip with -c constraints.txt, the project itself, no dev extras, no extra pins
    runs = [a for i, a in ins if i == "RUN"]
    pip = [r for r in runs if re.search(r"\bpip3? install\b", r)]
    assert len(pip) == 1, f"expected exactly one pip install step, got {pip}"
    words = shlex.split(pip[0].split("&&")[0])
    assert words[:2] == ["pip", "install"], words
    assert "-c" in words and words[words.index("-c") + 1] == "constraints.txt", f"pip install without -c constraints.txt: {words}"
    targets = [w for w in words[2:] if not w.startswith("-") and w != "constraints.txt"]
    assert targets[0] == ".", f"pip installs {targets}; expected the project ('.') first"
    unpinned = [t for t in targets[1:] if re.sub(r"[-_.]+", "-", t).lower() not in pins]
    assert not unpinned, f"{unpinned}: installed in the image but not pinned in constraints.txt"
    assert not re.search(r"\[dev\]|==|>=", pip[0]), "versions come from constraints.txt only"
    at = ins.index(("RUN", pip[0]))
    assert any(i == "COPY" and "constraints.txt" in a.split() for i, a in ins[:at]), \
        "constraints.txt must be copied before pip install"

    # non-root: the last USER is neither root nor uid 0, and it is set before the install
    users = [a.split(":")[0] for i, a in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0"), f"the image must run as a non-root user, USER={users}"
    # no secrets: no ENV/ARG that looks like a credential, no credentials files copied
    secretish = re.compile(r"(KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AWS_)", re.I)
    for i, a in ins:
        if i in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", a) or [a.split()[0]]
            bad = [n for n in names if secretish.search(n)]
            assert not bad, f"{i} {bad}: no credentials in the image"
        if i in ("COPY", "ADD"):
            assert not re.search(r"\.aws|credentials|\.env\b|id_rsa", a), f"{i} {a}: looks like a secret"
    ignore = [w for w in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split("\n")
              if w.strip() and not w.startswith("#")]
    assert ignore[0] == "**" and "!.venv" not in ignore, "the build context must be an allow-list"


# ------------------------------------------------------------------------------- KubeRay RayJob
# Required fields of the KubeRay ray.io/v1 CRDs, read from the Go API types the CRD YAML
# (ray-operator/config/crd/bases/ray.io_rayjobs.yaml) is generated from: ray-project/kuberay
# ray-operator/apis/ray/v1/raycluster_types.go @ 3275ee09f6a6c899c37e82ea6349785536de6bd4 and
# rayjob_types.go @ 0057210ed5a94e830c864af372577328c3542b44. A field whose json tag lacks
# `omitempty` is required by controller-gen. RayJobSpec itself has no required field (every one is
# `omitempty`); the operator refuses a RayJob without rayClusterSpec or clusterSelector, and without
# an entrypoint outside InteractiveMode, so those are checked too.
CRD_REQUIRED = {
    "RayClusterSpec": {"headGroupSpec": dict},
    "HeadGroupSpec": {"rayStartParams": dict, "template": dict},                      # map[string]string, PodTemplateSpec
    "WorkerGroupSpec": {"groupName": str, "minReplicas": int, "maxReplicas": int,     # string, *int32, *int32
                        "rayStartParams": dict, "template": dict},
}
# Types of the optional RayJobSpec / RayClusterSpec / WorkerGroupSpec fields the manifest uses.
CRD_TYPES = {
    "RayJobSpec": {"entrypoint": str, "runtimeEnvYAML": str, "shutdownAfterJobFinishes": bool,
                   "ttlSecondsAfterFinished": int, "backoffLimit": int, "activeDeadlineSeconds": int,
                   "submitterConfig": dict, "rayClusterSpec": dict, "entrypointResources": str,
                   "entrypointNumCpus": (int, float), "entrypointNumGpus": (int, float), "metadata": dict,
                   "submissionMode": str, "jobId": str, "suspend": bool, "clusterSelector": dict},
    "RayClusterSpec": {"rayVersion": str, "enableInTreeAutoscaling": bool, "workerGroupSpecs": list,
                       "headGroupSpec": dict, "autoscalerOptions": dict},
    "WorkerGroupSpec": {"replicas": int, "groupName": str, "minReplicas": int, "maxReplicas": int,
                        "rayStartParams": dict, "template": dict, "numOfHosts": int, "idleTimeoutSeconds": int},
    "HeadGroupSpec": {"rayStartParams": dict, "template": dict, "serviceType": str, "enableIngress": bool},
}


def check_fields(obj: dict, kind: str, where: str) -> None:
    assert isinstance(obj, dict), f"{where}: expected a mapping"
    for name, typ in CRD_REQUIRED.get(kind, {}).items():
        assert name in obj, f"{where}: missing required field {name!r} ({kind})"
    known = CRD_TYPES.get(kind, {})
    for name, value in obj.items():
        assert name in known, f"{where}.{name}: not a field of {kind} (known: {sorted(known)})"
        typ = known[name]
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        assert ok, f"{where}.{name}: expected {typ}, got {type(value).__name__} {value!r}"


def pod_containers(tpl: dict, where: str) -> list[dict]:
    spec = tpl.get("spec")
    assert isinstance(spec, dict) and isinstance(spec.get("containers"), list) and spec["containers"], \
        f"{where}.template.spec.containers: required (PodSpec)"
    for i, c in enumerate(spec["containers"]):
        assert isinstance(c.get("name"), str) and c["name"], f"{where}: container {i} needs a name (Container)"
        assert isinstance(c.get("image"), str) and c["image"], f"{where}: container {c['name']} needs an image"
    return spec["containers"]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = list(yaml.safe_load_all((INFRA / "k8s" / "rayjob.yaml").read_text()))
    assert len(docs) == 1, "rayjob.yaml holds one document"
    return docs[0]


def test_rayjob_matches_the_kuberay_crd(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rayjob["metadata"]["name"]), "metadata.name: a DNS label"
    spec = rayjob["spec"]
    check_fields(spec, "RayJobSpec", "spec")
    assert spec.get("entrypoint") and spec.get("rayClusterSpec"), "spec needs entrypoint and rayClusterSpec"
    rc = spec["rayClusterSpec"]
    check_fields(rc, "RayClusterSpec", "spec.rayClusterSpec")
    head = rc["headGroupSpec"]
    check_fields(head, "HeadGroupSpec", "headGroupSpec")
    containers = {"head": pod_containers(head["template"], "headGroupSpec")}
    groups = rc["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups), "groupName must be unique"
    for g in groups:
        where = f"workerGroupSpecs[{g.get('groupName')}]"
        check_fields(g, "WorkerGroupSpec", where)
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], where
        containers[g["groupName"]] = pod_containers(g["template"], where)
    # rayStartParams is map[string]string: every value a string (a bare number fails the CRD)
    for where, params in [("head", head["rayStartParams"])] + [(g["groupName"], g["rayStartParams"]) for g in groups]:
        for k, v in params.items():
            assert isinstance(v, str), f"{where}.rayStartParams.{k}: must be a string, got {v!r}"
    assert rc["rayVersion"] == constraints()["ray"], "rayVersion must be the pinned ray (the image's)"
    images = {c["image"] for cs in containers.values() for c in cs}
    assert len(images) == 1, f"every Ray node runs the same image, got {images}"


def test_rayjob_gpu_and_cpu_groups_and_s3_secret(rayjob):
    spec = rayjob["spec"]
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]

    def limits(g):
        return g["template"]["spec"]["containers"][0]["resources"]["limits"]

    gpu = [g for g in groups.values() if int(limits(g).get("nvidia.com/gpu", 0)) > 0]
    cpu = [g for g in groups.values() if int(limits(g).get("nvidia.com/gpu", 0)) == 0]
    assert gpu and cpu, "one GPU group (model actors) and one CPU group (decoding)"
    n_gpus = sum(g["replicas"] * int(limits(g)["nvidia.com/gpu"]) for g in gpu)
    assert int(env["VD_GPUS"]) == n_gpus, f"--concurrency ($VD_GPUS={env['VD_GPUS']}) must equal the {n_gpus} GPUs"
    assert all(g["minReplicas"] == g["maxReplicas"] for g in gpu), "GPU workers must all exist when the job starts"
    # KubeRay passes rayStartParams on a bash line: `--resources=<value>` must decode to the JSON object
    decode = json.loads(env["VD_DECODE_RESOURCES"])
    offered = {}
    for g in cpu:
        raw = g["rayStartParams"]["resources"]
        (arg,) = shlex.split(f"--resources={raw}")
        offered.update(json.loads(arg.split("=", 1)[1]))
    assert set(decode) <= set(offered), f"--decode-resources {decode} not offered by the CPU group ({offered})"
    assert all("resources" not in g["rayStartParams"] or "decode" not in g["rayStartParams"]["resources"] for g in gpu)
    # S3 credentials: from the Kubernetes secret, in every Ray container, never as literal values
    for where, tpl in [("head", spec["rayClusterSpec"]["headGroupSpec"]["template"])] + \
                      [(n, g["template"]) for n, g in groups.items()]:
        cenv = {e["name"]: e for e in tpl["spec"]["containers"][0].get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert key in cenv, f"{where}: {key} missing"
            assert "value" not in cenv[key] and cenv[key]["valueFrom"]["secretKeyRef"]["name"], \
                f"{where}: {key} must come from a secretKeyRef"
    text = (INFRA / "k8s" / "rayjob.yaml").read_text()
    assert not re.search(r"(?i)(aws_secret_access_key|aws_access_key_id)\s*[:=]\s*[A-Za-z0-9/+]{16,}", text)
    for k, v in env.items():
        assert "s3://" not in v or v.startswith("s3://"), k
    assert all(env[k].startswith("s3://") for k in ("VD_STORE", "VD_ARTEFACTS")), "outputs go to s3://"


def entrypoint_commands(entrypoint: str, env: dict) -> list[list[str]]:
    """The commands of the ``bash -c`` script, continuation lines joined, $VARs from ``env``."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["bash", "-c"] and len(words) == 3, f"entrypoint must be one `bash -c '<script>'`: {words[:3]}"
    script = words[2]
    cmds = []
    for line in script.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", line))
        missing = used - set(env)
        assert not missing, f"{line[:60]}…: {sorted(missing)} not defined in runtimeEnvYAML env_vars"
        # split like bash, then expand each word (as "$VAR": no re-splitting, no quote processing)
        cmds.append([re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env[m.group(1)], w)
                     for w in shlex.split(line)])
    return cmds


def test_rayjob_entrypoint_survives_the_submitter_shell_and_uses_real_flags(rayjob):
    from vitdecomp.cli import build_parser

    spec = rayjob["spec"]
    entry = spec["entrypoint"].strip()
    # KubeRay (common/job.go BuildJobSubmitCommand) joins `ray job submit ... -- <entrypoint> ;` into one
    # `sh -c` line: the entrypoint must reach `ray job submit` as the same words, unexpanded.
    line = f"printf '%s\\0' -- {entry} ;"
    got = subprocess.run(["/bin/sh", "-c", line], capture_output=True, check=True,
                         env={"PATH": os.environ["PATH"]}).stdout.decode().split("\0")[:-1]
    assert got == ["--", *shlex.split(entry)], "the submitter's shell would split or expand the entrypoint"
    script = shlex.split(entry)[2]
    syntax = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert syntax.returncode == 0, f"bash syntax error in the entrypoint: {syntax.stderr}"

    env = {**yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]}
    cmds = entrypoint_commands(entry, env)
    stray = [c for c in cmds if c[0].startswith("-")]
    assert not stray, f"a line starts with a flag (missing '\\' on the line before?): {stray}"
    vd_cmds = [c for c in cmds if c[0] == "vitdecomp"]
    assert [c[1:3] if c[1] in ("fit", "query") else c[1:2] for c in vd_cmds][:3] == \
        [["decompose"], ["fit", "compalign"], ["fit", "textspan"]], "decompose → fit → query, in that order"
    queries = [c[2] for c in vd_cmds if c[1] == "query"]
    assert {"compattribute", "mitigate"} <= set(queries) and queries[-1] == "report", queries
    parser = build_parser()
    for c in vd_cmds:
        try:
            ns = parser.parse_args(c[1:])
        except SystemExit:
            pytest.fail(f"vitdecomp rejects: {' '.join(c)}")
        sub = parser
        for word in c[1:3]:                           # the subcommand's own parser: its exact flag names
            actions = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
            if actions and word in actions[0].choices:
                sub = actions[0].choices[word]
        flags = {o for a in sub._actions for o in a.option_strings}
        unknown = [w for w in c if w.startswith("--") and w not in flags]
        assert not unknown, f"{' '.join(c[:3])}: {unknown} are not (full) flag names (argparse would accept prefixes)"
        if c[1] == "decompose":
            assert ns.device == "cuda" and ns.output == env["VD_STORE"] and int(ns.concurrency) == int(env["VD_GPUS"])
            assert ns.decode_resources == {"decode": 1.0}
        elif c[2] != "report":
            assert ns.store == env["VD_STORE"]
    # the artefacts (local to the head pod) are copied to S3 last
    assert cmds[-2][:2] == ["python", "-c"] and cmds[-2][-1] == env["VD_ARTEFACTS"]


def test_artefact_copy_step_copies_a_directory_tree_to_s3(tmp_path, rayjob):
    """The RayJob's last step (pyarrow.fs.copy_files from the head's disk to $VD_ARTEFACTS), run against moto."""
    cmds = entrypoint_commands(rayjob["spec"]["entrypoint"].strip(),
                               {**yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]})
    copy_cmd = cmds[-2]
    (tmp_path / "fit").mkdir()
    (tmp_path / "fit" / "align.json").write_text('{"ok": 1}')
    (tmp_path / "query" / "ca").mkdir(parents=True)
    (tmp_path / "query" / "ca" / "compattribute.json").write_text("{}")
    s3 = MotoS3()
    try:
        s3.client().create_bucket(Bucket="artefacts")
        env = {**os.environ, "AWS_ENDPOINT_URL": s3.endpoint}
        r = subprocess.run([sys.executable, "-c", copy_cmd[2], str(tmp_path), "s3://artefacts/run1"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket="artefacts")["Contents"]
                      if not o["Key"].endswith("/"))                 # pyarrow also writes directory markers
        assert keys == ["run1/fit/align.json", "run1/query/ca/compattribute.json"]
    finally:
        s3.close()


# --------------------------------------------------------------------- Ray cluster launcher config
def test_cluster_yaml_passes_rays_schema_and_has_a_gpu_group():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    cfg = prepare_config(copy.deepcopy(raw))         # what `ray up` does before talking to the cloud
    validate_config(cfg)
    types = raw["available_node_types"]
    gpu = {n: t for n, t in types.items() if re.match(r"(g|p)\d", t["node_config"]["InstanceType"])}
    assert gpu, "a GPU worker type (AWS g*/p* instance)"
    assert all(t["min_workers"] == t["max_workers"] >= 1 for t in gpu.values()), "GPU workers present at job start"
    assert any("decode" in t.get("resources", {}) for n, t in types.items() if n not in gpu), \
        "a CPU worker type offering the 'decode' resource used with --decode-resources"
    assert types[raw["head_node_type"]]["resources"].get("CPU") == 0, "no tasks on the head"
    # Ray gives only the head a default instance profile; workers read and write S3 and need their own
    workers = [n for n in types if n != raw["head_node_type"]]
    assert all("IamInstanceProfile" in types[n]["node_config"] for n in workers), "worker types need an S3 profile"
    assert not re.search(r"(?i)aws_secret|secret_access_key", (INFRA / "ray" / "cluster.yaml").read_text())
    with pytest.raises(Exception):                    # the schema check is real: a typo is refused
        broken = copy.deepcopy(raw)
        broken["available_node_types"]["head"]["min_worker"] = 1
        validate_config(prepare_config(broken))


def runtime_env() -> dict:
    return yaml.safe_load((INFRA / "ray" / "runtime_env.yaml").read_text())


def test_working_dir_upload_is_small_and_has_the_code(tmp_path):
    from ray._private.runtime_env.packaging import _zip_files

    env = runtime_env()
    assert set(env) <= {"excludes", "env_vars"} and not any(
        re.search(r"(?i)key|secret|token|passw", k) for k in env.get("env_vars", {}))
    out = tmp_path / "pkg.zip"
    _zip_files(str(ROOT), env["excludes"], str(out), include_gitignore=True)   # what `--working-dir .` uploads
    names = zipfile.ZipFile(out).namelist()
    assert "vitdecomp/pipeline/job.py" in names and "jobs/decompose.py" in names and "infra/ray/runtime_env.yaml" in names
    heavy = [n for n in names if n.split("/")[0] in (".git", ".venv", ".vitdecomp-demo", ".pytest_cache")]
    assert not heavy, f"uploaded: {heavy[:5]}"
    assert out.stat().st_size < 5 * 2**20, f"working_dir package is {out.stat().st_size / 2**20:.1f} MiB"


# ------------------------------------------------------------------ two Ray nodes on loopback + ray job submit
_TAKEN: set[int] = set()


def distinct_port() -> int:
    """A free port not handed out before in this session (two ``free_port()`` calls can return the same
    port once its probe socket is closed, and Ray refuses two components on one port)."""
    while True:
        p = free_port()
        if p not in _TAKEN:
            _TAKEN.add(p)
            return p


class LoopbackCluster:
    """A Ray head (127.0.0.2) and a second node (127.0.0.3) on this machine, each with its own custom
    resource, temp dir, ports and worker-port range. Every process is found again by a marker in its
    environment and stopped by PID (SIGTERM, then SIGKILL: gcs_server ignores SIGTERM)."""

    HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"

    def __init__(self):
        self.token = uuid.uuid4().hex
        self.tmp = Path(tempfile.mkdtemp(prefix="vdray-"))          # short: Ray's socket paths have a length limit
        self.gcs_port, self.dashboard_port = distinct_port(), distinct_port()
        # worker ports below the kernel's ephemeral range and above Ray's default 10002-19999
        base = random.Random(self.token).randrange(20000, 29800, 200)
        self.worker_ports = [(base, base + 99), (base + 100, base + 199)]
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "AUTOSCALER_METRIC_PORT": str(distinct_port()), "DASHBOARD_METRIC_PORT": str(distinct_port()),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "VITDECOMP_TEST_CLUSTER": self.token, "HF_HUB_OFFLINE": "1"}
        self.env.pop("RAY_ADDRESS", None)
        self.ray = str(Path(sys.executable).with_name("ray"))

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str], ip: str, ports: tuple[int, int], resources: dict, tmp: str) -> None:
        cmd = [self.ray, "start", f"--node-ip-address={ip}", "--num-cpus=2", "--object-store-memory=300000000",
               f"--resources={json.dumps(resources)}", f"--min-worker-port={ports[0]}", f"--max-worker-port={ports[1]}",
               f"--dashboard-agent-listen-port={distinct_port()}", f"--dashboard-agent-grpc-port={distinct_port()}",
               f"--runtime-env-agent-port={distinct_port()}", f"--metrics-export-port={distinct_port()}",
               f"--node-manager-port={distinct_port()}", f"--object-manager-port={distinct_port()}",
               f"--ray-client-server-port={distinct_port()}", f"--temp-dir={tmp}", "--disable-usage-stats", *args]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"ray start ({ip}) failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")

    def start(self) -> "LoopbackCluster":
        self._start(["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true"],
                    self.HEAD_IP, self.worker_ports[0], {"vd_head": 100}, str(self.tmp / "h"))
        self._start([f"--address={self.HEAD_IP}:{self.gcs_port}"], self.NODE_IP, self.worker_ports[1],
                    {"vd_node_b": 100}, str(self.tmp / "b"))
        deadline = time.time() + 60
        while True:                                  # both nodes registered with their resources
            r = subprocess.run([self.ray, "status", f"--address={self.HEAD_IP}:{self.gcs_port}"], env=self.env,
                               capture_output=True, text=True, timeout=60)
            if "vd_node_b" in r.stdout and "vd_head" in r.stdout:
                return self
            if time.time() > deadline:
                raise RuntimeError(f"the second node did not join:\n{r.stdout}\n{r.stderr}")
            time.sleep(1)

    def processes(self):
        import psutil

        found = []
        for p in psutil.process_iter(["pid"]):
            try:
                if p.pid != os.getpid() and p.environ().get("VITDECOMP_TEST_CLUSTER") == self.token:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found

    def stop(self) -> None:
        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.tmp, ignore_errors=True)


def reference(valid: dict[str, bytes], ids: list[str]):
    torch.manual_seed(0)                              # the job's workers build the random-init model from seed 0
    lm = vd.load_model(MODEL)
    x = torch.stack([lm.transform(Image.open(io.BytesIO(valid[i])).convert("RGB")) for i in ids])
    return vd.decompose(lm, x)


@pytest.mark.slow
def test_ray_job_submit_to_two_loopback_nodes_decomposes_into_s3(tmp_path):
    images = tmp_path / "images"
    valid = make_images(images, n=10, seed=3)
    files = sorted(p for p in images.rglob("*") if p.is_file())
    s3 = MotoS3()
    cluster = LoopbackCluster()
    try:
        c = s3.client()
        c.create_bucket(Bucket="corpus")
        c.create_bucket(Bucket="stores")
        for p in files:
            c.put_object(Bucket="corpus", Key=f"imgs/{p.relative_to(images).as_posix()}", Body=p.read_bytes())
        t0 = time.time()
        cluster.start()
        t_started = time.time()
        store = "s3://stores/cluster-run"
        submit = [cluster.ray, "job", "submit", f"--address={cluster.address}", "--working-dir", ".",
                  "--runtime-env", "infra/ray/runtime_env.yaml", "--",
                  "python", "jobs/decompose.py", "--input", "s3://corpus/imgs", "--output", store,
                  "--model", MODEL, "--label-from-folder", "--batch-size", "4", "--commit-every", "4",
                  "--s3-endpoint", s3.endpoint,
                  "--decode-resources", '{"vd_head": 1}', "--worker-resources", '{"vd_node_b": 1}']

        def run_job():
            try:
                r = subprocess.run(submit, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=300)
            except subprocess.TimeoutExpired as e:
                out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
                pytest.fail(f"ray job submit did not finish in 300 s (pending resources?):\n{out[-6000:]}")
            assert r.returncode == 0, f"job failed (rc {r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
            return r.stdout

        out = run_job()
        t_job = time.time()
        assert "succeeded" in out.lower(), out[-3000:]
        # placement: decoding only on the head, the model actors only on the second node, every input seen
        n_inputs = len(valid) + N_BAD
        assert f"decompose: decoding ran on {cluster.HEAD_IP} ({n_inputs} inputs)" in out, out[-3000:]
        assert f"decompose: model actors ran on {cluster.NODE_IP} ({n_inputs} inputs)" in out, out[-3000:]
        assert f"decompose: {len(valid)} images written, {N_BAD} errors, 0 already stored" in out

        st = open_store(store, s3_endpoint=s3.endpoint)
        ids = st.ids()
        assert sorted(ids) == sorted(valid) and len(set(ids)) == len(ids)
        assert sorted(st.errors().column("image_id").to_pylist()) == sorted([*BAD, "bad/truncated.png"])
        assert st.manifest["model"]["name"] == MODEL
        b = next(st.iter_batches(batch_size=len(valid), columns=["label"]))
        assert b.columns["label"].to_pylist() == [i.split("/")[0] for i in b.ids]
        ref = reference(valid, b.ids)
        np.testing.assert_allclose(b.contributions, ref.contributions.numpy(), rtol=0,
                                   atol=2e-3 * float(ref.contributions.abs().max()))      # fp16 storage

        # resubmitting the same job resumes: everything is already stored, nothing is written twice
        out2 = run_job()
        assert f"decompose: 0 images written, 0 errors, {n_inputs} already stored" in out2, out2[-3000:]
        assert open_store(store, s3_endpoint=s3.endpoint).count() == len(valid)
        print(f"\ncluster start {t_started - t0:.1f} s, first job {t_job - t_started:.1f} s, "
              f"rerun {time.time() - t_job:.1f} s\n" + "\n".join(l for l in out.splitlines() if l.startswith("decompose:")))
    finally:
        cluster.stop()
        s3.close()
    assert not cluster.processes(), "Ray processes survived the teardown"
