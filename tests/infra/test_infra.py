"""CI validation of infra/ without a cluster, a cloud account or a Docker daemon.

What is checked:

* every YAML file under infra/ parses and holds the expected kinds;
* the KubeRay manifests have the fields the pipeline relies on (autoscaling bounds,
  GPU group sizing, shutdown/TTL, CronJob concurrency, Service -> Serve port, ...);
* infra/aws/cluster.yaml passes Ray's own cluster-launcher schema validation after the
  same default filling `ray up` does (and deliberately broken copies fail it); its EC2
  node_config blocks pass botocore's RunInstances parameter validation;
* every `python jobs/X.py ...` command in the manifests, the launcher config and the
  README code blocks is parsed with the job's REAL argparse parser (`build_parser()`),
  and every flag must be spelled out in full (no abbreviations);
* Dockerfiles: COPY sources exist and are not excluded by .dockerignore, base images
  are pinned, a non-root USER is set, torch is installed (pinned) before the project,
  and the CUDA base matches the torch CUDA wheel;
* no literal credentials anywhere under infra/; Ray pods get S3 credentials from a
  Kubernetes Secret (envFrom.secretRef / secretKeyRef).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.util
import io
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
DOCKER = INFRA / "docker"
CLUSTER_YAML = INFRA / "aws" / "cluster.yaml"
README = INFRA / "README.md"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))

JOB_SCRIPTS = ("embed_catalog", "refresh_catalog", "search", "build_index", "serve_search")
SECRET_NAME = "musicfm-s3-credentials"

# kind multiset expected in each Kubernetes manifest
EXPECTED_KINDS = {
    "rayjob-embed.yaml": ["RayJob"],
    "cronjob-refresh.yaml": ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"],
    "raycluster.yaml": ["RayCluster", "RayJob", "Service"],
    "secret.example.yaml": ["Secret"],
    "kustomization.yaml": ["Kustomization"],
}
API_VERSIONS = {
    "RayJob": "ray.io/v1",
    "RayCluster": "ray.io/v1",
    "RayCronJob": "ray.io/v1",
    "CronJob": "batch/v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "ServiceAccount": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}


# --------------------------------------------------------------------------- helpers


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def load_docs(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_docs(name: str) -> list[dict]:
    return load_docs(K8S / name)


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"].get("name") == name)]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def nested_yaml_docs(value: str) -> list[dict] | None:
    """Kubernetes objects embedded in a string (e.g. a ConfigMap holding a RayJob)."""
    if "apiVersion:" not in value or "kind:" not in value:
        return None
    try:
        docs = [d for d in yaml.safe_load_all(value) if d is not None]
    except yaml.YAMLError:
        return None
    if docs and all(isinstance(d, dict) and "kind" in d for d in docs):
        return docs
    return None


def all_k8s_objects() -> Iterator[tuple[str, dict]]:
    """Every Kubernetes object under infra/k8s, including ones embedded in ConfigMaps."""
    for path in sorted(K8S.glob("*.y*ml")):
        for doc in load_docs(path):
            yield rel(path), doc
            if doc.get("kind") == "ConfigMap":
                for key, value in (doc.get("data") or {}).items():
                    for inner in nested_yaml_docs(value) or []:
                        yield f"{rel(path)}:ConfigMap/{doc['metadata']['name']}[{key}]", inner


def ray_cluster_specs() -> Iterator[tuple[str, dict]]:
    """(where, rayClusterSpec) for every RayCluster / RayJob / RayCronJob under infra/k8s."""
    for where, obj in all_k8s_objects():
        kind, spec = obj.get("kind"), obj.get("spec") or {}
        if kind == "RayCluster":
            yield f"{where}:{kind}", spec
        elif kind == "RayJob" and "rayClusterSpec" in spec:
            yield f"{where}:{kind}", spec["rayClusterSpec"]
        elif kind == "RayCronJob":
            yield f"{where}:{kind}", spec["jobTemplate"]["rayClusterSpec"]


def group_containers(cluster_spec: dict) -> Iterator[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster_spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        for c in group["template"]["spec"]["containers"]:
            yield name, c


def gpu_count(container: dict) -> int:
    limits = (container.get("resources") or {}).get("limits") or {}
    return int(limits.get("nvidia.com/gpu", 0))


def mem_gib(q: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", str(q))
    assert m, f"unparsable memory quantity {q!r}"
    scale = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, None: 2**-30}[m.group(2)]
    return float(m.group(1)) * scale


def cpu_cores(q: str | int) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


# ------------------------------------------------------------- job command extraction


@dataclass(frozen=True)
class Invocation:
    where: str
    job: str
    argv: tuple[str, ...]

    def flags(self) -> set[str]:
        return {a.split("=", 1)[0] for a in self.argv if a.startswith("--")}

    def value(self, flag: str) -> str | None:
        for i, a in enumerate(self.argv):
            if a == flag and i + 1 < len(self.argv):
                return self.argv[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
        return None


_PY = r"python(?:3(?:\.\d+)?)?"
_JOB_IN_STRING = re.compile(
    rf"(?:^|(?<=[\s;&|(]))(?:\S*/)?{_PY}\s+(?:-u\s+)?(?:\S*/)?jobs/(?P<job>[A-Za-z_]\w*)\.py(?=\s|$)"
)
_SHELL_OPERATOR = re.compile(r"[();<>|&]+")


def split_shell_args(rest: str) -> list[str]:
    """shlex-split the arguments after the script, stopping at a shell operator."""
    lex = shlex.shlex(rest, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    out: list[str] = []
    for tok in lex:
        if _SHELL_OPERATOR.fullmatch(tok):
            break
        out.append(tok)
    return out


def invocations_in_string(text: str, where: str) -> list[Invocation]:
    text = re.sub(r"\\\r?\n", " ", text)  # join shell line continuations
    found = []
    for m in _JOB_IN_STRING.finditer(text):
        rest = text[m.end() :].split("\n", 1)[0]
        found.append(Invocation(where, m.group("job"), tuple(split_shell_args(rest))))
    return found


def invocations_in_obj(obj: Any, where: str) -> list[Invocation]:
    """Walk parsed YAML: strings (shell commands), lists (exec-form commands), nested YAML."""
    found: list[Invocation] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += invocations_in_obj(v, f"{where}.{k}")
    elif isinstance(obj, list):
        strings = [x for x in obj if isinstance(x, str)]
        if len(strings) == len(obj) and len(obj) >= 2:
            for i in range(len(obj) - 1):
                m = re.fullmatch(r"(?:\S*/)?jobs/([A-Za-z_]\w*)\.py", obj[i + 1])
                if re.fullmatch(rf"(?:\S*/)?{_PY}", obj[i]) and m:
                    found.append(Invocation(f"{where}[{i}]", m.group(1), tuple(obj[i + 2 :])))
                    return found
        for i, v in enumerate(obj):
            found += invocations_in_obj(v, f"{where}[{i}]")
    elif isinstance(obj, str):
        inner = nested_yaml_docs(obj)
        if inner is not None:
            for j, doc in enumerate(inner):
                found += invocations_in_obj(doc, f"{where}<doc{j}>")
        else:
            found += invocations_in_string(obj, where)
    return found


def readme_code_blocks() -> list[tuple[str, str, int]]:
    if not README.exists():
        return []
    text = README.read_text(encoding="utf-8")
    blocks = []
    # fenced blocks, also indented ones inside list items
    for m in re.finditer(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^[ \t]*```", text, flags=re.S | re.M):
        indent = len(m.group(1))
        body = "".join(
            line[indent:] if line[:indent].isspace() else line for line in m.group(3).splitlines(True)
        )
        line = text[: m.start()].count("\n") + 1
        blocks.append((m.group(2).lower(), body, line))
    return blocks


def collect_invocations() -> list[Invocation]:
    found: list[Invocation] = []
    for path in sorted(INFRA.rglob("*.y*ml")):
        for i, doc in enumerate(load_docs(path)):
            kind = doc.get("kind", "") if isinstance(doc, dict) else ""
            found += invocations_in_obj(doc, f"{rel(path)}#{i}{':' + kind if kind else ''}")
    for lang, body, line in readme_code_blocks():
        where = f"{rel(README)}:{line}"
        if lang in ("yaml", "yml"):
            for i, doc in enumerate(d for d in yaml.safe_load_all(body) if d is not None):
                found += invocations_in_obj(doc, f"{where}#{i}")
        elif lang in ("bash", "sh", "shell", "console", ""):
            found += invocations_in_string(body, where)
    return found


def _safe_collect() -> list[Any]:
    try:
        invs = collect_invocations()
    except Exception as e:  # surface as a failing test instead of a collection error
        return [pytest.param(None, id=f"collection-error-{type(e).__name__}")]
    return [pytest.param(inv, id=f"{inv.where}->{inv.job}") for inv in invs]


@contextlib.contextmanager
def _repo_on_path() -> Iterator[None]:
    saved = list(sys.path)
    sys.path[:0] = [str(REPO), str(REPO / "jobs")]
    try:
        yield
    finally:
        sys.path[:] = saved


@functools.cache
def job_parser(job: str) -> argparse.ArgumentParser:
    """The job's real parser: import jobs/<job>.py by path (main() is not run)."""
    path = REPO / "jobs" / f"{job}.py"
    assert path.is_file(), f"{rel(path)} does not exist (the job scripts expose build_parser())"
    spec = importlib.util.spec_from_file_location(f"_infra_test_jobs_{job}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with _repo_on_path():
        spec.loader.exec_module(module)
    assert hasattr(module, "build_parser"), f"{rel(path)} has no module-level build_parser()"
    parser = module.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def parse_or_error(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[Any, str | None]:
    """parse_args, returning (namespace, None) or (None, argparse's error message)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv), None
    except SystemExit as e:
        return None, err.getvalue().strip() or f"SystemExit({e.code})"


def unknown_or_abbreviated_flags(parser: argparse.ArgumentParser, argv: tuple[str, ...]) -> list[str]:
    """Flags that are not spelled exactly like one of the parser's option strings.

    argparse accepts unambiguous prefixes (`--gpu` for `--gpu-actors`); manifests must
    not rely on that, so a renamed flag cannot silently bind to a different option.
    """
    known = set(parser._option_string_actions)
    return [a for a in argv if a.startswith("--") and a.split("=", 1)[0] not in known]


# ---------------------------------------------------------------- YAML / manifests


def test_infra_layout_exists():
    for path in [CLUSTER_YAML, README, *(K8S / n for n in EXPECTED_KINDS)]:
        assert path.is_file(), f"missing {rel(path)}"
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.gpu", "Dockerfile.cpu"}


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.y*ml")), ids=rel)
def test_every_yaml_parses(path: Path):
    docs = load_docs(path)
    assert docs, f"{rel(path)} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{rel(path)}: top-level document is not a mapping"


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_manifest_kinds_and_api_versions(name: str):
    docs = k8s_docs(name)
    assert sorted(d.get("kind") for d in docs) == sorted(EXPECTED_KINDS[name])
    for d in docs:
        assert d.get("apiVersion") == API_VERSIONS[d["kind"]], f"{name}: {d['kind']} apiVersion"
        if d["kind"] != "Kustomization":
            md = d.get("metadata") or {}
            assert md.get("name") or md.get("generateName"), f"{name}: {d['kind']} without a name"


def test_no_unexpected_manifests():
    assert {p.name for p in K8S.glob("*.y*ml")} == set(EXPECTED_KINDS)


def test_kustomization_resources_exist():
    kust = one(k8s_docs("kustomization.yaml"), "Kustomization")
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
    assert "secret.example.yaml" not in kust["resources"], "the example Secret must not be deployed"


def _dockerfile_arg(name: str, dockerfile: str = "Dockerfile.gpu") -> str:
    return parse_dockerfile(DOCKER / dockerfile).args[name]


def test_ray_clusters_are_well_formed():
    ray_version = _dockerfile_arg("RAY_VERSION")
    specs = list(ray_cluster_specs())
    assert len(specs) >= 3, "expected the embed RayJob, the refresh RayJob template and the RayCluster"
    for where, spec in specs:
        assert spec["rayVersion"] == ray_version, f"{where}: rayVersion != image RAY_VERSION"
        assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling off"
        head = spec["headGroupSpec"]
        assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: rayStartParams"
        workers = spec["workerGroupSpecs"]
        names = [g["groupName"] for g in workers]
        assert len(names) == len(set(names)), f"{where}: duplicate groupName"
        for g in workers:
            lo, n, hi = g["minReplicas"], g.get("replicas", g["minReplicas"]), g["maxReplicas"]
            assert 0 <= lo <= n <= hi, f"{where}/{g['groupName']}: replicas bounds {lo} <= {n} <= {hi}"
            assert all(isinstance(v, str) for v in g.get("rayStartParams", {}).values())
        gpu_groups = [g for g in workers if any(gpu_count(c) for c in g["template"]["spec"]["containers"])]
        cpu_groups = [g for g in workers if g not in gpu_groups]
        assert gpu_groups and cpu_groups, f"{where}: needs a GPU group and a CPU (decode) group"
        for g in gpu_groups:
            (c,) = g["template"]["spec"]["containers"]
            res = c["resources"]
            assert gpu_count(c) == 1, f"{where}: one GPU per worker pod (one MusicFM actor per GPU)"
            assert res["requests"].get("nvidia.com/gpu") in (None, 1, "1")
            assert 6 <= cpu_cores(res["limits"]["cpu"]) <= 16, f"{where}: ~8 CPU per GPU"
            assert 24 <= mem_gib(res["limits"]["memory"]) <= 64, f"{where}: ~32Gi per GPU"
            tol = g["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tol), f"{where}: GPU taint toleration"
            assert c["image"].endswith("-gpu"), f"{where}: GPU group must run the GPU image"
        for group, c in group_containers(spec):
            assert ":" in c["image"] and not c["image"].endswith(":latest"), f"{where}/{group}: image tag"
            assert c.get("resources", {}).get("limits"), f"{where}/{group}: no resource limits"


def _words(text: str) -> set[str]:
    return set(text.split())


# Field names of the KubeRay ray.io/v1 API types (RayJobSpec, RayClusterSpec, HeadGroupSpec,
# WorkerGroupSpec, AutoscalerOptions) across current releases. A typo such as
# `shutdownAfterJobFinish` would otherwise be silently pruned by the API server.
KUBERAY_FIELDS = {
    "RayJobSpec": _words(
        "activeDeadlineSeconds backoffLimit rayClusterSpec submitterPodTemplate metadata clusterSelector"
        " submitterConfig managedBy deletionStrategy entrypoint runtimeEnvYAML jobId submissionMode"
        " entrypointResources entrypointNumCpus entrypointNumGpus ttlSecondsAfterFinished"
        " shutdownAfterJobFinishes suspend"
    ),
    "RayClusterSpec": _words(
        "headGroupSpec workerGroupSpecs rayVersion enableInTreeAutoscaling autoscalerOptions"
        " headServiceAnnotations suspend gcsFaultToleranceOptions managedBy upgradeStrategy"
    ),
    "HeadGroupSpec": _words("serviceType headService enableIngress rayStartParams template resources"),
    "WorkerGroupSpec": _words(
        "groupName replicas minReplicas maxReplicas idleTimeoutSeconds numOfHosts rayStartParams template"
        " scaleStrategy suspend resources"
    ),
    "AutoscalerOptions": _words(
        "resources image imagePullPolicy env envFrom volumeMounts securityContext idleTimeoutSeconds"
        " upscalingMode version"
    ),
}


def _check_fields(obj: dict, type_name: str, where: str) -> None:
    unknown = set(obj) - KUBERAY_FIELDS[type_name]
    assert not unknown, f"{where}: unknown {type_name} field(s) {sorted(unknown)}"


def test_kuberay_fields_are_known():
    checked = 0
    for where, obj in all_k8s_objects():
        kind, spec = obj.get("kind"), obj.get("spec") or {}
        if kind == "RayJob":
            _check_fields(spec, "RayJobSpec", where)
            assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "InteractiveMode")
            cluster = spec.get("rayClusterSpec")
        elif kind == "RayCluster":
            cluster = spec
        else:
            continue
        if cluster is None:
            continue
        checked += 1
        _check_fields(cluster, "RayClusterSpec", where)
        _check_fields(cluster["headGroupSpec"], "HeadGroupSpec", where)
        for g in cluster.get("workerGroupSpecs", []):
            _check_fields(g, "WorkerGroupSpec", f"{where}/{g.get('groupName')}")
        opts = cluster.get("autoscalerOptions") or {}
        _check_fields(opts, "AutoscalerOptions", where)
        assert opts.get("upscalingMode", "Default") in ("Default", "Aggressive", "Conservative")
    assert checked >= 3
    with pytest.raises(AssertionError):
        _check_fields({"shutdownAfterJobFinish": True}, "RayJobSpec", "negative control")


def test_embed_rayjob():
    rj = one(k8s_docs("rayjob-embed.yaml"), "RayJob")
    spec = rj["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("activeDeadlineSeconds", 1) > 0
    (inv,) = invocations_in_obj(spec["entrypoint"], "entrypoint")
    assert inv.job == "embed_catalog"
    expected = {
        "--checkpoint": "msd",
        "--layers": "7,12",
        "--precision": "bf16",
        "--gpu-actors": "1:4",
        "--decode-cpus": "2:32",
        "--batch-size": "8",
        "--chunk-size": "1000",
    }
    for flag, value in expected.items():
        assert inv.value(flag) == value, f"{flag} should be {value}"
    assert inv.value("--catalog").startswith("s3://") and inv.value("--output").startswith("s3://")
    # the --gpu-actors pool's maximum must fit in the GPU group (one actor per GPU, one GPU per pod),
    # which may scale to zero
    from pipeline.cli import pool_size

    gpu_group = next(
        g
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
        if any(gpu_count(c) for c in g["template"]["spec"]["containers"])
    )
    assert pool_size(inv.value("--gpu-actors"))[1] <= gpu_group["maxReplicas"]
    assert gpu_group["minReplicas"] == 0


def test_refresh_cronjob():
    docs = k8s_docs("cronjob-refresh.yaml")
    cron = one(docs, "CronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert isinstance(cron["startingDeadlineSeconds"], int) and cron["startingDeadlineSeconds"] > 0
    assert len(cron["schedule"].split()) == 5, "standard 5-field cron schedule"
    job = cron["jobTemplate"]["spec"]
    assert isinstance(job["backoffLimit"], int) and job["backoffLimit"] >= 0
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    # the launcher's service account, RBAC and RayJob template are in the same file
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == sa
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == one(docs, "Role")["metadata"]["name"]
    assert any(s["name"] == sa for s in binding["subjects"])
    rules = one(docs, "Role")["rules"]
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in rules)
    cm_names = {v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
    cm = one(docs, "ConfigMap")
    assert cm["metadata"]["name"] in cm_names
    (rayjob,) = [d for v in cm["data"].values() for d in nested_yaml_docs(v) or []]
    assert rayjob["kind"] == "RayJob" and rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    # the RayJob must give up before the launcher Job's deadline
    assert rayjob["spec"]["activeDeadlineSeconds"] < job["activeDeadlineSeconds"]
    (inv,) = invocations_in_obj(rayjob["spec"]["entrypoint"], "entrypoint")
    assert inv.job == "refresh_catalog"
    assert {"--catalog", "--store", "--delete-missing", "--log-format"} <= inv.flags()
    assert inv.value("--max-error-rate") == "0.01" and inv.value("--log-format") == "json"
    # the launcher script creates the RayJob from the mounted template
    launcher = pod["containers"][0]
    script = "\n".join(launcher.get("command", []) + launcher.get("args", []))
    cm_volume = next(
        v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]
    )
    mount = next(m["mountPath"] for m in launcher["volumeMounts"] if m["name"] == cm_volume)
    (key,) = cm["data"]
    assert f"kubectl create -f {mount}/{key}" in script
    assert not pod["containers"][0]["image"].endswith(":latest")


def test_raycluster_and_search_service():
    docs = k8s_docs("raycluster.yaml")
    rc = one(docs, "RayCluster")
    name = rc["metadata"]["name"]
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    serve_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    svc = one(docs, "Service")
    assert svc["spec"]["selector"] == {"ray.io/cluster": name, "ray.io/node-type": "head"}
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 8000
    target = port.get("targetPort", port["port"])
    assert (serve_ports.get(target) if isinstance(target, str) else target) == 8000
    assert 8000 in serve_ports.values()
    serve = one(docs, "RayJob")["spec"]
    assert serve["clusterSelector"] == {"ray.io/cluster": name}, "the search RayJob must reuse the cluster"
    assert "rayClusterSpec" not in serve and not serve.get("shutdownAfterJobFinishes", False)
    (inv,) = invocations_in_obj(serve["entrypoint"], "entrypoint")
    assert inv.job == "serve_search" and inv.value("--store").startswith("s3://")
    assert inv.value("--port") in (None, "8000")


# ------------------------------------------------------- job commands vs real parsers


@pytest.mark.parametrize("inv", _safe_collect())
def test_job_command_parses_with_real_parser(inv: Invocation | None):
    if inv is None:
        collect_invocations()  # re-raise the collection error with its traceback
        pytest.fail("collecting job invocations failed")
    assert inv.job in JOB_SCRIPTS, f"{inv.where}: unknown job script jobs/{inv.job}.py"
    parser = job_parser(inv.job)
    bad = unknown_or_abbreviated_flags(parser, inv.argv)
    assert not bad, f"{inv.where}: flags not defined (exactly) by jobs/{inv.job}.py: {bad}"
    ns, err = parse_or_error(parser, list(inv.argv))
    assert err is None, f"{inv.where}: jobs/{inv.job}.py rejected {list(inv.argv)}: {err}"
    assert isinstance(ns, argparse.Namespace)


def test_manifests_cover_the_three_entrypoints():
    jobs_by_file: dict[str, set[str]] = {}
    for inv in collect_invocations():
        jobs_by_file.setdefault(inv.where.split("#")[0].split(":")[0], set()).add(inv.job)
    assert "embed_catalog" in jobs_by_file["infra/k8s/rayjob-embed.yaml"]
    assert "refresh_catalog" in jobs_by_file["infra/k8s/cronjob-refresh.yaml"]
    assert "serve_search" in jobs_by_file["infra/k8s/raycluster.yaml"]


def _mangle_one_flag(argv: tuple[str, ...]) -> list[str]:
    out = list(argv)
    i = next(i for i, a in enumerate(out) if a.startswith("--"))
    out[i] = out[i].split("=", 1)[0] + "x" + (("=" + out[i].split("=", 1)[1]) if "=" in out[i] else "")
    return out


def test_mangled_flag_is_rejected():
    """Negative control: the parse test above can fail on a typo in a flag."""
    inv = next(i for i in collect_invocations() if i.job == "embed_catalog")
    parser = job_parser("embed_catalog")
    mangled = _mangle_one_flag(inv.argv)
    assert unknown_or_abbreviated_flags(parser, tuple(mangled)), mangled
    ns, err = parse_or_error(parser, mangled)
    assert ns is None and err, f"jobs/embed_catalog.py accepted a mangled flag: {mangled}"
    ns, err = parse_or_error(parser, list(inv.argv))  # while the original parses
    assert err is None, err


def test_refresh_rejects_embed_only_flag():
    """--output belongs to embed_catalog; refresh_catalog writes to --store."""
    refresh = next(i for i in collect_invocations() if i.job == "refresh_catalog")
    argv = [("--output" if a == "--store" else a) for a in refresh.argv]
    ns, err = parse_or_error(job_parser("refresh_catalog"), argv)
    assert ns is None and err, "jobs/refresh_catalog.py accepted --output"


def test_abbreviated_flag_is_flagged():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu-actors", type=int)
    argv = ("--gpu", "4")
    ns, err = parse_or_error(parser, list(argv))
    assert err is None and ns.gpu_actors == 4  # argparse alone would accept it ...
    assert unknown_or_abbreviated_flags(parser, argv) == ["--gpu"]  # ... the test does not


def test_extractor_handles_shell_forms():
    text = (
        "set -e; ray job submit --address http://h:8265 -- python jobs/embed_catalog.py \\\n"
        "  --catalog 's3://b/c d.parquet' --layers 7,12 && echo done\n"
        "python3 /app/jobs/refresh_catalog.py --store s3://x; rm -f /tmp/x\n"
        "python -c 'import jobs' ; pythonic jobs/embed_catalog.py --nope\n"
    )
    invs = invocations_in_string(text, "t")
    assert [(i.job, i.argv) for i in invs] == [
        ("embed_catalog", ("--catalog", "s3://b/c d.parquet", "--layers", "7,12")),
        ("refresh_catalog", ("--store", "s3://x")),
    ]
    listed = invocations_in_obj({"command": ["python", "jobs/serve_search.py", "--port", "8000"]}, "x")
    assert [(i.job, i.argv) for i in listed] == [("serve_search", ("--port", "8000"))]
    nested = invocations_in_obj(
        {
            "data": {
                "j.yaml": "apiVersion: ray.io/v1\nkind: RayJob\nspec:\n  entrypoint: >-\n"
                "    python jobs/refresh_catalog.py\n    --store s3://s\n"
            }
        },
        "cm",
    )
    assert [(i.job, i.argv) for i in nested] == [("refresh_catalog", ("--store", "s3://s"))]


# ------------------------------------------------------------ Ray cluster launcher


def _prepare_and_validate(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: fill defaults, then schema-validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_schema_validation():
    config = load_docs(CLUSTER_YAML)[0]
    prepared = _prepare_and_validate(config)
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert types[head]["max_workers"] == 0
    gpu_types = [n for n, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    cpu_types = [n for n, t in types.items() if n != head and not t["resources"].get("GPU")]
    assert gpu_types and cpu_types, "needs a GPU worker node type and a CPU worker node type"
    for n, t in types.items():
        if n != head:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"], n
    # images: pinned tags, GPU node type runs the GPU image
    docker = prepared["docker"]
    images = [docker["image"]] + [t.get("docker", {}).get("worker_image") for t in types.values()]
    for image in filter(None, images):
        assert re.search(r":[\w][\w.-]*$", image) and not image.endswith(":latest"), image
    for n in gpu_types:
        assert types[n]["docker"]["worker_image"].endswith("-gpu"), n
    # no `pip install ray` nightly from the AWS defaults sneaking in
    assert not any("ray-wheels" in c for c in prepared["setup_commands"])


BROKEN_CLUSTER_CONFIGS = {
    "unknown-top-level-key": lambda c: c.update(max_worker=3),
    "wrong-type": lambda c: c.update(max_workers="twelve"),
    "node-type-typo": lambda c: c["available_node_types"]["gpu"].update(node_confg={}),
    "missing-resources": lambda c: c["available_node_types"]["gpu"].pop("resources"),
    "bad-docker-key": lambda c: c["docker"].update(imagee="x:1"),
    "unknown-head-type": lambda c: c.update(head_node_type="nope"),
    "min-workers-over-max": lambda c: (
        c.update(max_workers=1),
        c["available_node_types"]["cpu_decode"].update(min_workers=1),
        c["available_node_types"]["gpu"].update(min_workers=1),
    ),
}


@pytest.mark.parametrize("mutate", BROKEN_CLUSTER_CONFIGS.values(), ids=BROKEN_CLUSTER_CONFIGS.keys())
def test_broken_cluster_yaml_fails_validation(mutate):
    import jsonschema

    config = load_docs(CLUSTER_YAML)[0]
    _prepare_and_validate(config)  # the unmodified config passes ...
    mutate(config)  # ... one targeted break must not
    with pytest.raises((jsonschema.ValidationError, ValueError, AssertionError, KeyError)):
        _prepare_and_validate(config)


def test_cluster_yaml_node_configs_are_valid_ec2_run_instances_params():
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import validate_parameters

    model = botocore_session.get_session().get_service_model("ec2").operation_model("RunInstances")
    instance_types = set(model.input_shape.members["InstanceType"].enum)
    config = load_docs(CLUSTER_YAML)[0]
    for name, t in config["available_node_types"].items():
        node_config = t["node_config"]
        validate_parameters(dict(node_config, MinCount=1, MaxCount=1), model.input_shape)
        assert node_config["InstanceType"] in instance_types, f"{name}: unknown instance type"
    # and the check itself can fail
    with pytest.raises(Exception, match="Unknown parameter"):
        validate_parameters({"MinCount": 1, "MaxCount": 1, "InstanceTyp": "g6.2xlarge"}, model.input_shape)


# ------------------------------------------------------------------------ Dockerfiles


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]  # ARG defaults (global and stage)
    instructions: list[tuple[str, str]]  # (INSTRUCTION, rest) with continuations joined


def parse_dockerfile(path: Path) -> Dockerfile:
    text = path.read_text(encoding="utf-8")
    lines, buf = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    instructions, args = [], {}
    for line in lines:
        op, _, rest = line.partition(" ")
        op = op.upper()
        instructions.append((op, rest.strip()))
        if op == "ARG" and "=" in rest:
            k, v = rest.strip().split("=", 1)
            args[k] = v.strip().strip('"')
    return Dockerfile(path, args, instructions)


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def copy_sources(df: Dockerfile) -> list[str]:
    """Build-context sources of every COPY/ADD (not --from=stage copies, not URLs)."""
    sources = []
    for op, rest in df.instructions:
        if op not in ("COPY", "ADD"):
            continue
        if rest.lstrip().startswith("["):  # exec form: COPY ["src", "dst"]
            parts = yaml.safe_load(rest)
        else:
            parts = shlex.split(rest)
        if any(p.startswith("--from") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        sources += [expand(src, df.args) for src in parts[:-1] if not re.match(r"https?://", src)]
    return sources


class DockerIgnore:
    """Enough of .dockerignore semantics for this check (Go filepath.Match + `**`, `!`)."""

    def __init__(self, text: str):
        self.rules: list[tuple[bool, re.Pattern]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pat = line[1:] if negate else line
            pat = pat.strip("/").removeprefix("./")
            rx = ""
            i = 0
            while i < len(pat):
                if pat.startswith("**/", i):
                    rx, i = rx + "(?:.*/)?", i + 3
                elif pat.startswith("**", i):
                    rx, i = rx + ".*", i + 2
                elif pat[i] == "*":
                    rx, i = rx + "[^/]*", i + 1
                elif pat[i] == "?":
                    rx, i = rx + "[^/]", i + 1
                else:
                    rx, i = rx + re.escape(pat[i]), i + 1
            self.rules.append((negate, re.compile(rx + r"\Z")))

    def excluded(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for negate, rx in self.rules:
            if any(rx.match(c) for c in candidates):
                excluded = not negate
        return excluded


def dockerignore() -> DockerIgnore:
    path = REPO / ".dockerignore"
    assert path.is_file(), ".dockerignore missing at the repo root"
    return DockerIgnore(path.read_text(encoding="utf-8"))


def test_dockerignore_excludes_local_state():
    ign = dockerignore()
    for p in [
        ".venv",
        ".git",
        "demo_store",
        "pkg/__pycache__/x.pyc",
        ".pytest_cache",
        ".ruff_cache",
        "x.egg-info",
        "tests",
        "shared",
        "outputs",
    ]:
        assert ign.excluded(p), f".dockerignore should exclude {p}"
    for p in [
        "pyproject.toml",
        "README.md",
        "musicfm/model.py",
        "pipeline/schemas.py",
        "jobs/embed_catalog.py",
    ]:
        assert not ign.excluded(p), f".dockerignore must not exclude {p}"


def test_dockerignore_matcher():
    ign = DockerIgnore("*.md\n!README.md\n**/__pycache__\nbuild\n")
    assert ign.excluded("NOTES.md") and not ign.excluded("README.md") and not ign.excluded("docs/a.md")
    assert (
        ign.excluded("a/b/__pycache__/c.pyc") and ign.excluded("build/x") and not ign.excluded("src/build.py")
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=rel)
def test_dockerfile_copy_sources_exist_and_are_in_context(path: Path):
    df = parse_dockerfile(path)
    sources = copy_sources(df)
    assert sources, f"{rel(path)} copies nothing from the repo"
    ign = dockerignore()
    for src in sources:
        matches = list(REPO.glob(src.rstrip("/"))) if any(ch in src for ch in "*?[") else [REPO / src]
        assert matches and all(m.exists() for m in matches), f"{rel(path)}: COPY source {src!r} not in repo"
        assert not ign.excluded(src.rstrip("/")), (
            f"{rel(path)}: COPY source {src!r} excluded by .dockerignore"
        )


@pytest.mark.parametrize("path", DOCKERFILES, ids=rel)
def test_dockerfile_base_pinned_and_non_root(path: Path):
    df = parse_dockerfile(path)
    froms = [expand(rest.split()[0], df.args) for op, rest in df.instructions if op == "FROM"]
    assert froms
    for image in froms:
        assert "$" not in image, f"unresolved ARG in FROM {image}"
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and tag and "/" not in tag, f"{rel(path)}: base image {image} is not pinned to a tag"
        assert tag != "latest", f"{rel(path)}: base image {image} uses :latest"
    users = [expand(rest, df.args) for op, rest in df.instructions if op == "USER"]
    assert users, f"{rel(path)}: no USER (would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0", ""), f"{rel(path)}: final USER is root"


@pytest.mark.parametrize("path", DOCKERFILES, ids=rel)
def test_dockerfile_installs_pinned_torch_first(path: Path):
    df = parse_dockerfile(path)
    runs = [expand(rest, df.args) for op, rest in df.instructions if op == "RUN"]
    torch_ix = next(i for i, r in enumerate(runs) if "download.pytorch.org/whl/" in r)
    assert re.search(r"torch==\d+\.\d+\.\d+", runs[torch_ix]), "torch must be pinned"
    project_ix = next(
        i for i, r in enumerate(runs) if re.search(r"pip install[^&]*\s\"?\.(\[[\w,]+\])?\"?(\s|$)", r)
    )
    assert torch_ix < project_ix, "torch must be installed before `pip install .`"
    assert "--constraint" in runs[project_ix] or "-c " in runs[project_ix], "keep the torch build pinned"
    assert re.search(r"ray\[[^\]]*default[^\]]*\]==\d", runs[project_ix]), "ray[default] (dashboard) pinned"
    envs = " ".join(rest for op, rest in df.instructions if op == "ENV")
    assert "HF_HOME=" in envs


def test_images_agree_on_versions():
    gpu, cpu = (parse_dockerfile(DOCKER / n) for n in ("Dockerfile.gpu", "Dockerfile.cpu"))
    for key in ("RAY_VERSION", "TORCH_VERSION", "PYARROW_VERSION", "PYLANCE_VERSION", "APP_UID"):
        assert gpu.args[key] == cpu.args[key], key
    # Ray checks Python major.minor.patch across nodes: same OS release => same python3.
    gpu_base = expand(next(r for op, r in gpu.instructions if op == "FROM").split()[0], gpu.args)
    cpu_base = expand(next(r for op, r in cpu.instructions if op == "FROM").split()[0], cpu.args)
    assert gpu_base.split("-")[-1] == "ubuntu" + cpu_base.split(":")[-1], (gpu_base, cpu_base)
    # CUDA runtime base matches the torch CUDA wheel (cu130 <-> 13.0.x)
    m = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.", gpu_base)
    assert m, gpu_base
    assert gpu.args["TORCH_CUDA"] == f"cu{m.group(1)}{m.group(2)}", (gpu_base, gpu.args["TORCH_CUDA"])


# ---------------------------------------------------------------------------- secrets

_AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{16}(?![A-Z0-9])")
_AWS_SECRET_ASSIGN = re.compile(
    r"(?i)(secret[_-]?access[_-]?key|aws_secret|secret_key)\W{0,4}[:=]\s*[\"']?(?P<v>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
)
_PRIVATE_KEY = re.compile(r"-----BEGIN (?:RSA |EC |OPENSSH )?PRIVATE KEY-----")
_SECRET_ENV_NAME = re.compile(r"(?i)(SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL)")


def find_literal_secrets(text: str) -> list[str]:
    hits = [m.group(0) for m in _AWS_KEY_ID.finditer(text)]
    hits += [m.group("v") for m in _AWS_SECRET_ASSIGN.finditer(text)]
    hits += [m.group(0) for m in _PRIVATE_KEY.finditer(text)]
    return hits


def test_secret_scanner_detects_keys():
    fake_id = "AKIA" + "IOSFODNN7" + "EXAMPLE"
    fake_secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    assert find_literal_secrets(f"AWS_ACCESS_KEY_ID={fake_id}")
    assert find_literal_secrets(f'aws_secret_access_key: "{fake_secret}"')
    assert not find_literal_secrets("AWS_SECRET_ACCESS_KEY: REPLACE_ME_SECRET_ACCESS_KEY")


@pytest.mark.parametrize(
    "path",
    sorted(p for p in INFRA.rglob("*") if p.is_file()) + [REPO / ".dockerignore"],
    ids=rel,
)
def test_no_literal_secrets_in_infra(path: Path):
    assert not find_literal_secrets(path.read_text(encoding="utf-8", errors="replace")), rel(path)


def _containers(obj: Any) -> Iterator[dict]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                yield from (c for c in v if isinstance(c, dict))
            else:
                yield from _containers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _containers(v)


def test_credentials_only_from_secrets():
    for where, obj in all_k8s_objects():
        for c in _containers(obj):
            for env in c.get("env", []):
                if _SECRET_ENV_NAME.search(env["name"]):
                    assert "value" not in env, f"{where}/{c['name']}: literal value for {env['name']}"
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}/{c['name']}: {env['name']}"
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET_NAME, f"{where}: unknown Secret {ref['name']}"
            for src in c.get("envFrom", []):
                assert "configMapRef" not in src or not _SECRET_ENV_NAME.search(src["configMapRef"]["name"])
                if "secretRef" in src:
                    assert src["secretRef"]["name"] == SECRET_NAME, f"{where}: unknown Secret"
    # every Ray node container (head and workers) reads the S3 credentials Secret
    for where, spec in ray_cluster_specs():
        for group, c in group_containers(spec):
            refs = [s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s]
            refs += [
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            ]
            assert SECRET_NAME in refs, f"{where}/{group}: no S3 credentials from Secret {SECRET_NAME}"


def test_only_placeholder_secret_objects():
    secrets = [(w, o) for w, o in all_k8s_objects() if o.get("kind") == "Secret"]
    assert [w for w, _ in secrets] == ["infra/k8s/secret.example.yaml"]
    ((_, secret),) = secrets
    assert secret["metadata"]["name"] == SECRET_NAME
    assert "data" not in secret, "use stringData placeholders in the example, not base64 data"
    for key, value in secret["stringData"].items():
        if _SECRET_ENV_NAME.search(key):
            assert "REPLACE" in str(value), f"{key} must be a REPLACE_ME placeholder"
    text = (K8S / "secret.example.yaml").read_text(encoding="utf-8")
    assert "EXAMPLE ONLY" in text and "PLACEHOLDER" in text


# ----------------------------------------------------------------------------- README


def test_readme_sizing_guide_and_code_blocks():
    text = README.read_text(encoding="utf-8")
    for needle in (
        "PER_GPU_XRT",
        "PER_CORE_DECODE_XRT",
        "bench/model_forward.py",
        "bench/pipeline_bench.py",
        "ceil(H × 3600 / (W × PER_GPU_XRT))",
        "ceil(H × 3600 / (W × PER_CORE_DECODE_XRT))",
    ):
        assert needle in text, f"README sizing guide lacks {needle!r}"
    for lang, body, line in readme_code_blocks():
        if lang in ("yaml", "yml"):
            assert [d for d in yaml.safe_load_all(body) if d is not None], f"README:{line}: empty YAML"
