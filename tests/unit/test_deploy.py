"""Every manifest in deploy/ parses and agrees with the package, the Dockerfile and the guide.

No Kubernetes or Docker here: the manifests are read as YAML and checked for what KubeRay and
the package need (one pinned image whose Ray is the package's Ray, credentials only from
Secrets, a GPU worker group, the job spec mounted where the RayJob's entrypoint reads it).
"""

from __future__ import annotations

import inspect
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from smolvla_ray.data import storage
from smolvla_ray.spec import spec_from_dict

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
DOCKERFILE = DEPLOY / "Dockerfile"
GUIDE = DEPLOY / "README.md"

KNOWN_KINDS = {
    ("ray.io/v1", "RayCluster"),
    ("ray.io/v1", "RayJob"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
}
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
IMAGE_RAY = re.compile(r"ray(\d+\.\d+\.\d+)")
# Commented optional fields with their default, as KubeRay v1.7 defines them.
COMMENTED_DEFAULTS = {
    "RayCluster": [
        "# suspend: false",
        "# enableInTreeAutoscaling: false",
        "# numOfHosts: 1",
        "# serviceType: ClusterIP",
    ],
    "RayJob": [
        "# submissionMode: K8sJobMode",
        "# suspend: false",
        "# clusterSelector: {}",
        "# enableInTreeAutoscaling: false",
        "# numOfHosts: 1",
    ],
}


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in MANIFESTS for doc in load(path)]


def docs_of(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in all_docs() if doc["kind"] == kind]


def cluster_specs() -> list[dict[str, Any]]:
    """The RayCluster specs: standalone ones and those inside RayJobs."""
    specs = [doc["spec"] for doc in docs_of("RayCluster")]
    specs += [doc["spec"]["rayClusterSpec"] for doc in docs_of("RayJob")]
    return specs


def pod_specs(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container anywhere below `node` (pod templates, submitter templates, ...)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)


def ray_pin() -> str:
    """'2.60' from pyproject's `ray[...]==2.60.*`."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if re.match(r"ray(\[|=)", d)]
    match = re.search(r"==\s*(\d+\.\d+)(?:\.\*|\.\d+)", ray)
    assert match, f"pyproject pins ray as {ray!r}; expected ray[...]==X.Y.*"
    return match.group(1)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        current += " " + stripped.removesuffix("\\") if current else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_args() -> dict[str, str]:
    out = {}
    for op, rest in dockerfile_instructions():
        if op == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            out[name.strip()] = value.strip().strip('"')
    return out


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


# ---------------------------------------------------------------- manifests: shape


def test_expected_manifests_exist():
    names = {p.relative_to(DEPLOY).as_posix() for p in MANIFESTS}
    assert {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/secret-example.yaml",
    } <= names
    kinds = {doc["kind"] for _, doc in all_docs()}
    assert {"RayCluster", "RayJob", "ConfigMap", "Secret"} <= kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_kinds_and_api_versions(path: Path):
    docs = load(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert (doc.get("apiVersion"), doc.get("kind")) in KNOWN_KINDS, path.name
        assert doc["metadata"]["name"]


def uncomment_fields(text: str) -> str:
    """Every `# field: value` line whose `#` stands at the field's indentation, made live."""
    return re.sub(r"(?m)^(\s*)# ([A-Za-z_][A-Za-z0-9_]*:(?:\s|$))", r"\1\2", text)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_commented_optional_fields_are_well_placed(path: Path):
    """Uncommented, the `# field: default` lines still make valid YAML of the same kinds, and
    none lands at the top level of a document."""
    text = path.read_text()
    live = uncomment_fields(text)
    assert live != text, f"{path.name} shows no optional field as a commented line"
    docs = [doc for doc in yaml.safe_load_all(live) if doc is not None]
    assert [d["kind"] for d in docs] == [d["kind"] for d in load(path)]
    for doc in docs:
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec", "data", "stringData", "type"}


@pytest.mark.parametrize("kind", sorted(COMMENTED_DEFAULTS))
def test_optional_fields_show_their_defaults(kind: str):
    paths = [p for p, doc in all_docs() if doc["kind"] == kind]
    assert paths
    for path in paths:
        text = path.read_text()
        for line in COMMENTED_DEFAULTS[kind]:
            assert line in text, f"{path.name} lacks the commented default {line!r}"


# ---------------------------------------------------------------- image and Ray version


def test_ray_version_matches_package_pin_image_and_dockerfile():
    pin = ray_pin()
    docker_ray = dockerfile_args()["RAY_VERSION"]
    base = dockerfile_args()["BASE_IMAGE"]
    assert docker_ray.startswith(pin + "."), f"Dockerfile RAY_VERSION {docker_ray} vs {pin}.*"
    assert f":{docker_ray}-" in base, f"BASE_IMAGE {base} is not Ray {docker_ray}"
    specs = cluster_specs()
    assert specs
    for spec in specs:
        assert spec["rayVersion"] == docker_ray
        for container in containers(spec):
            match = IMAGE_RAY.search(container["image"].rsplit(":", 1)[-1])
            assert match, f"image {container['image']} does not name its Ray (-rayX.Y.Z)"
            assert match.group(1) == spec["rayVersion"]


def test_one_pinned_image_everywhere():
    images = {c["image"] for _, doc in all_docs() for c in containers(doc)}
    assert len(images) == 1, f"containers use several images: {sorted(images)}"
    (image,) = images
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag not in ("", "latest"), f"{image} is not pinned"


# ---------------------------------------------------------------- credentials


def test_no_inline_secret_values():
    for path, doc in all_docs():
        for container in containers(doc):
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env, f"{path.name}: {env['name']} has a literal value"
                    assert "secretKeyRef" in env.get("valueFrom", {}), (path.name, env["name"])
            for source in container.get("envFrom", []):
                assert set(source) <= {"secretRef", "configMapRef", "prefix"}, path.name


def test_every_ray_container_gets_the_storage_secret():
    (secret,) = docs_of("Secret")
    name = secret["metadata"]["name"]
    for spec in cluster_specs():
        for group, pod in pod_specs(spec):
            for container in pod["containers"]:
                refs = [
                    s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s
                ]
                assert name in refs, f"{group}/{container['name']} lacks Secret {name}"


def test_secret_example_holds_placeholders_only():
    (secret,) = docs_of("Secret")
    assert "data" not in secret  # base64 values could hide a real credential
    values = secret["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(values)
    for key, value in values.items():
        assert "placeholder" in value, f"{key} looks like a real value"
    text = (DEPLOY / "kuberay" / "secret-example.yaml").read_text()
    assert "kubectl create secret generic" in text and "--from-literal" in text


def test_no_credentials_anywhere_in_deploy():
    access_key = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert not access_key.search(path.read_text()), f"{path} holds an AWS key id"


# ---------------------------------------------------------------- pods


def test_gpu_worker_group_requests_gpus():
    for spec in cluster_specs():
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
        gpu_groups = 0
        for group in spec["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            limits = container["resources"]["limits"]
            if "nvidia.com/gpu" not in limits:
                continue
            gpu_groups += 1
            assert int(limits["nvidia.com/gpu"]) >= 1
            requests = container["resources"].get("requests", {})
            assert (
                requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
            )  # Kubernetes requires equal GPU requests and limits
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert gpu_groups >= 1


def test_pods_have_shm_and_a_node_local_cache():
    assert '"SMOLVLA_RAY_CACHE"' in inspect.getsource(storage)  # the variable the reader uses
    for spec in cluster_specs():
        for group, pod in pod_specs(spec):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            (container,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            shm = volumes[mounts["/dev/shm"]]
            assert shm["emptyDir"]["medium"] == "Memory", group
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            cache = env["SMOLVLA_RAY_CACHE"]
            parents = [m for m in mounts if cache == m or cache.startswith(m.rstrip("/") + "/")]
            assert parents, f"{group}: SMOLVLA_RAY_CACHE={cache} is on no mounted volume"
            assert "emptyDir" in volumes[mounts[parents[0]]], f"{group}: cache is not per pod"


def test_resources_are_set_on_every_ray_container():
    for spec in cluster_specs():
        for group, pod in pod_specs(spec):
            for container in pod["containers"]:
                resources = container["resources"]
                assert {"cpu", "memory"} <= set(resources["limits"]), group
                assert {"cpu", "memory"} <= set(resources["requests"]), group


# ---------------------------------------------------------------- the RayJob


def rayjob() -> dict[str, Any]:
    (job,) = docs_of("RayJob")
    return job


def entrypoint_spec_path() -> str:
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert argv[:2] == ["smolvla-ray", "run"], argv
    return argv[2]


def test_rayjob_entrypoint_reads_the_mounted_configmap():
    path = entrypoint_spec_path()
    spec = rayjob()["spec"]["rayClusterSpec"]
    pod = spec["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    configmaps = {doc["metadata"]["name"]: doc for doc in docs_of("ConfigMap")}
    found = False
    for mount in pod["containers"][0]["volumeMounts"]:
        root = mount["mountPath"].rstrip("/") + "/"
        source = volumes[mount["name"]].get("configMap")
        if not path.startswith(root) or source is None:
            continue
        relative = path[len(root) :]
        items = {i["path"]: i["key"] for i in source.get("items", [])}
        key = items.get(relative, relative if not items else None)
        assert key in configmaps[source["name"]]["data"], (source["name"], key)
        found = True
    assert found, f"{path} is not on a ConfigMap volume of the head"


def test_configmap_spec_validates_and_fits_the_cluster():
    (configmap,) = docs_of("ConfigMap")
    job = spec_from_dict(yaml.safe_load(configmap["data"]["spec.yaml"]), source="ConfigMap")
    assert job.scaling.use_gpu
    assert not job.storage_options  # credentials come from the Secret
    gpu_replicas = sum(
        g["replicas"] for g in rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert job.scaling.num_workers <= gpu_replicas
    for uri in (job.data.uri, job.checkpoint.storage):
        assert "://" in uri, f"{uri}: a multi-node job needs storage URIs, not local paths"


# ------------------------------------------------- the configs against the manifests

QUANTITY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "k": 1e3, "M": 1e6, "G": 1e9}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (`8`, `500m`, `40Gi`) as a number."""
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    for suffix, factor in QUANTITY.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def gpu_pods(cluster: dict[str, Any]) -> list[dict[str, float]]:
    """Per GPU worker group: replicas, GPUs, CPUs and the node-local cache's disk of a pod."""
    pods = []
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        limits = container["resources"]["limits"]
        if "nvidia.com/gpu" not in limits:
            continue
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        (mount,) = [m for m in mounts if env["SMOLVLA_RAY_CACHE"].startswith(m.rstrip("/") + "/")]
        disk = volumes[mounts[mount]]["emptyDir"]["sizeLimit"]
        pods.append(
            {
                "replicas": group["replicas"],
                "gpus": quantity(limits["nvidia.com/gpu"]),
                "cpus": quantity(limits["cpu"]),
                "disk": quantity(disk),
            }
        )
    return pods


def assert_job_fits(job: Any, cluster: dict[str, Any], where: str) -> None:
    """The job's workers fit the cluster's GPU pods: count, GPUs, CPUs (its own and one per
    loader process, reserved), and the node-local cache's bound on the pod's disk."""
    pods = gpu_pods(cluster)
    assert pods, where
    per_worker = job.scaling.resources_per_worker or {"CPU": 1, "GPU": 1}
    assert per_worker.get("CPU", 1) >= 1 + job.data.num_loader_workers, (
        f"{where}: a worker with {job.data.num_loader_workers} loader processes reserves "
        f"{per_worker.get('CPU', 1)} CPU(s)"
    )
    slots = sum(p["replicas"] * min(p["gpus"], p["cpus"] // per_worker.get("CPU", 1)) for p in pods)
    assert job.scaling.num_workers <= slots, f"{where}: {job.scaling.num_workers} > {slots}"
    for pod in pods:  # the video and the feature-shard caches, cache_max_bytes each
        assert 2 * int(job.data.cache_max_bytes) <= pod["disk"], where


@pytest.mark.parametrize("name", ["so100-finetune.yaml", "libero-finetune.yaml"])
def test_the_gpu_configs_fit_the_raycluster(name: str):
    from smolvla_ray.spec import load_spec

    job = load_spec(ROOT / "configs" / name)
    (cluster,) = docs_of("RayCluster")
    assert_job_fits(job, cluster["spec"], f"configs/{name} on deploy/kuberay/raycluster.yaml")


def test_the_rayjob_spec_fits_its_cluster():
    (configmap,) = docs_of("ConfigMap")
    job = spec_from_dict(yaml.safe_load(configmap["data"]["spec.yaml"]), source="ConfigMap")
    assert_job_fits(job, rayjob()["spec"]["rayClusterSpec"], "deploy/kuberay/rayjob.yaml")


def test_rayjob_lifecycle_fields():
    spec = rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0  # KubeRay: only with shutdownAfterJobFinishes
    assert spec["backoffLimit"] >= 0 and "clusterSelector" not in spec
    assert spec["submitterConfig"]["backoffLimit"] >= 0


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image_is_a_build_arg():
    ops = dockerfile_instructions()
    froms = [rest for op, rest in ops if op == "FROM"]
    assert froms and re.fullmatch(r"\$\{?BASE_IMAGE\}?(\s+AS\s+\w+)?", froms[0], re.I)
    first_from = next(i for i, (op, _) in enumerate(ops) if op == "FROM")
    assert any(op == "ARG" and rest.startswith("BASE_IMAGE=") for op, rest in ops[:first_from])
    assert {"TORCH_SPEC", "RAY_VERSION"} <= set(dockerfile_args())


def test_dockerfile_runs_as_non_root():
    ops, args = dockerfile_instructions(), dockerfile_args()
    start = max(i for i, (op, _) in enumerate(ops) if op in ("CMD", "ENTRYPOINT"))
    users = [expand(rest, args) for op, rest in ops[:start] if op == "USER"]
    assert users, "no USER before CMD/ENTRYPOINT"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"the image runs as {users[-1]}"


def test_dockerfile_installs_the_package_and_smoke_tests_it():
    ops = dockerfile_instructions()
    copies = [rest.split() for op, rest in ops if op == "COPY"]
    (pyproject_dest,) = [words[-1] for words in copies if "pyproject.toml" in words]
    assert any(
        words[-1].startswith(pyproject_dest) for words in copies if "smolvla_ray/" in words
    ), "smolvla_ray/ is not copied beside pyproject.toml"
    target = pyproject_dest.rstrip("/") or "."
    runs = [rest for op, rest in ops if op == "RUN"]
    installs = [r for r in runs if re.search(r"pip install\b[^&]*\s" + re.escape(target), r)]
    assert installs, f"no `pip install {target}` of the copied package"
    assert any("smolvla-ray --help" in r for r in runs), "no build-time smoke check"


def test_dockerfile_copies_only_what_exists_and_is_not_ignored():
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for op, rest in dockerfile_instructions():
        if op != "COPY":
            continue
        sources = [w for w in rest.split() if not w.startswith("--")][:-1]
        for source in sources:
            if "*" in source:  # a wildcard may match nothing (Docker allows that)
                continue
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            top = source.rstrip("/").split("/")[0]
            assert top not in ignored, f"COPY {source} but .dockerignore excludes it"


# ---------------------------------------------------------------- the guide agrees


def test_guide_names_the_manifests_image_and_entrypoint():
    text = GUIDE.read_text()
    images = {c["image"] for _, doc in all_docs() for c in containers(doc)}
    (image,) = images
    built = re.findall(r"docker build\b[^\n]*?-t\s+(\S+)", text.replace("\\\n", " "))
    assert image in built, f"deploy/README.md builds {built}, the manifests use {image}"
    assert rayjob()["spec"]["entrypoint"] in text
    assert re.search(r"helm install kuberay-operator \S+ --version \d+\.\d+\.\d+", text)
    assert "smolvla-ray submit" in text and "ray start --head" in text


def test_yamllint_clean():
    linter = pytest.importorskip("yamllint.linter")
    from yamllint.config import YamlLintConfig

    # yamllint's defaults, warnings included, with the project's line length.
    config = YamlLintConfig("extends: default\nrules:\n  line-length: {max: 100}\n")
    problems = [
        f"{path.name}:{p.line}: {p.message}"
        for path in MANIFESTS
        for p in linter.run(path.read_text(), config)
    ]
    assert not problems, "\n".join(problems)
