"""What a typo in deploy/k8s would break, read from the rendered objects of every overlay.

Each check follows one wire from where it is named to where it must land: a student's teacher
address to a Service, its port and the pods behind it; a probe to the port the server listens
on (the server's own config precedence: KDSERVE_SERVER__* over the file over the defaults);
the token to the Secret the README creates; the drain to the grace period; a recipe to the
model its teacher serves.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from student_worker.cli import EXIT_TEACHER_UNREACHABLE
from teacher_server.server.config import REMOTE_TOKEN_ENV, RemoteConfig, ServerConfig
from teacher_server.server.grpc_api import HEALTH_SERVICES
from teacher_server.server.serve import CLOSE_ANSWER_S
from teacher_server.shared.settings import AUTH_TOKEN_ENV
from tests.deploy.k8s import overlays, render

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SOURCE = "/opt/kdserve/src/"
"""Where the image holds the repository's files (docker/Dockerfile's WORKDIR)."""
TOKEN_SECRET = ("kdserve-token", "token")
GPU = "nvidia.com/gpu"
ADDRESS = re.compile(
    r"^(?:(?:grpcs\+)?dns:///|grpcs?://|https?://)(?P<host>[a-z0-9.-]+):(?P<port>\d+)(?:/(?P<model>[^/]+))?$"
)
"""A teacher address: a student's endpoint, or a remote member's `.../model`."""


@dataclass
class Container:
    """A container of a pod template, with the objects it came from."""

    owner: dict[str, Any]
    pod: dict[str, Any]
    spec: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.owner['kind']}/{self.owner['metadata']['name']}:{self.spec['name']}"

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.pod.get("metadata", {}).get("labels", {}))

    def commands(self) -> list[list[str]]:
        """The argv(s) it runs; a `sh -c` script's `exec` line once per `set --` choice."""
        argv = [*self.spec.get("command", []), *self.spec.get("args", [])]
        if argv[:2] != ["sh", "-c"]:
            return [argv]
        script = argv[2].replace("\\\n", " ")
        line = next(line for line in script.splitlines() if line.strip().startswith("exec "))
        words = shlex.split(line.strip().removeprefix("exec "))
        choices = re.search(r"^\s*set -- (.+)$", script, re.MULTILINE)
        if choices is None:
            return [words]
        return [[w.replace("${1}", c) for w in words] for c in choices.group(1).split()]

    def env(self) -> dict[str, dict[str, Any]]:
        return {item["name"]: item for item in self.spec.get("env", [])}


class Cluster:
    """The objects one overlay renders, and lookups across them."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = objects

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of(kind) if o["metadata"]["name"] == name]
        assert found, f"no {kind} named {name!r}"
        return found[0]

    def containers(self) -> list[Container]:
        found = []
        for owner in self.objects:
            for pod in pod_templates(owner):
                found += [Container(owner, pod, c) for c in pod["spec"]["containers"]]
        return found

    def teachers(self) -> list[Container]:
        return [c for c in self.containers() if "kdserve-teacher" in c.commands()[0]]

    def students(self) -> list[Container]:
        return [c for c in self.containers() if "kdserve-student" in c.commands()[0]]

    def server_config(self, teacher: Container) -> tuple[dict[str, Any], dict[str, str]]:
        """The teacher's config file (from its ConfigMap volume or the image) and the
        KDSERVE_SERVER__* settings of its environment."""
        argv = teacher.commands()[0]
        path = argv[argv.index("--config") + 1]
        if path.startswith(IMAGE_SOURCE):
            text = (ROOT / path.removeprefix(IMAGE_SOURCE)).read_text()
        else:
            text = self._mounted_file(teacher, path)
        env = {k: str(v["value"]) for k, v in teacher.env().items() if "value" in v}
        for source in teacher.spec.get("envFrom", []):
            env.update(self.get("ConfigMap", source["configMapRef"]["name"])["data"])
        server = {k: v for k, v in env.items() if k.startswith("KDSERVE_SERVER__")}
        return yaml.safe_load(text), server

    def _mounted_file(self, container: Container, path: str) -> str:
        for mount in container.spec.get("volumeMounts", []):
            if path.startswith(mount["mountPath"].rstrip("/") + "/"):
                volume = next(
                    v for v in container.pod["spec"]["volumes"] if v["name"] == mount["name"]
                )
                assert "configMap" in volume, f"{container.name}: {path} is not in a ConfigMap"
                key = path.removeprefix(mount["mountPath"].rstrip("/") + "/")
                return str(self.get("ConfigMap", volume["configMap"]["name"])["data"][key])
        raise AssertionError(f"{container.name}: nothing is mounted at {path}")

    def listening(self, teacher: Container) -> dict[str, int]:
        """The ports the server will listen on, by protocol, as the server resolves them."""
        config, env = self.server_config(teacher)
        server = config.get("server") or {}
        defaults = ServerConfig()
        return {
            name: int(
                env.get(f"KDSERVE_SERVER__{name.upper()}_PORT")
                or server.get(f"{name}_port")
                or getattr(defaults, f"{name}_port")
            )
            for name in ("http", "grpc")
        }

    def served_names(self, teacher: Container) -> set[str]:
        config, _ = self.server_config(teacher)
        return {m["name"] for m in [*config.get("models", []), *config.get("ensembles", [])]}

    def pods_behind(self, service: dict[str, Any]) -> list[Container]:
        selector = service["spec"]["selector"].items()
        return [c for c in self.containers() if selector <= c.labels.items()]


def pod_templates(owner: dict[str, Any]) -> list[dict[str, Any]]:
    spec = owner.get("spec", {})
    if owner["kind"] == "PyTorchJob":
        return [r["template"] for r in spec["pytorchReplicaSpecs"].values()]
    if owner["kind"] == "InferenceService":
        predictor = spec["predictor"]
        return [{"metadata": {}, "spec": predictor}]
    return [spec["template"]] if "template" in spec else []


def container_port(container: Container, port: int | str) -> int:
    """A probe's or Service's target port as a number (a name resolves in the container)."""
    if isinstance(port, int):
        return port
    for declared in container.spec.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"{container.name} declares no port named {port!r}")


@pytest.fixture(scope="module", params=overlays(), ids=lambda p: str(p.relative_to(ROOT)))
def cluster(request: pytest.FixtureRequest) -> Cluster:
    return Cluster(render(request.param))


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{argv[:3]}: no {name}"
    return argv[argv.index(name) + 1]


def test_every_teacher_address_names_a_service_port_and_a_teacher_behind_it(
    cluster: Cluster,
) -> None:
    addresses = []
    for student in cluster.students():
        addresses += [(student.name, flag(argv, "--teacher")) for argv in student.commands()]
    for front in cluster.teachers():
        config, _ = cluster.server_config(front)
        for ensemble in config.get("ensembles", []):
            addresses += [(front.name, member) for member in ensemble["members"]]
    for who, address in addresses:
        match = ADDRESS.match(address)
        assert match, f"{who}: {address!r} is not an address this project reads"
        service = cluster.get("Service", match["host"])
        ports = {p["port"]: p for p in service["spec"]["ports"]}
        assert int(match["port"]) in ports, f"{who}: {address} but {match['host']} has {ports}"
        behind = cluster.pods_behind(service)
        assert behind and all(c in cluster.teachers() for c in behind), f"{who}: {address}"
        for teacher in behind:
            target = ports[int(match["port"])].get("targetPort", int(match["port"]))
            protocol = "http" if address.startswith("http") else "grpc"
            assert container_port(teacher, target) == cluster.listening(teacher)[protocol]
        if "dns:///" in address:
            assert service["spec"].get("clusterIP") == "None", f"{who}: dns:/// needs headless"
        if match["model"]:  # a remote member's model
            assert all(match["model"] in cluster.served_names(t) for t in behind), address


def test_probes_and_ports_are_those_the_server_listens_on(cluster: Cluster) -> None:
    for teacher in cluster.teachers():
        listening = cluster.listening(teacher)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = teacher.spec.get(kind)
            if probe is None:
                continue
            if "grpc" in probe:
                assert probe["grpc"]["port"] == listening["grpc"], (teacher.name, kind)
                service = probe["grpc"].get("service", "")
                assert service in HEALTH_SERVICES, (teacher.name, kind, service)
            else:
                port = container_port(teacher, probe["httpGet"]["port"])
                assert port == listening["http"], (teacher.name, kind)
        declared = {p["containerPort"] for p in teacher.spec["ports"]}
        assert declared <= set(listening.values()), (teacher.name, declared, listening)
        assert teacher.spec.get("readinessProbe"), f"{teacher.name} has no readiness probe"


def test_the_token_comes_from_the_secret_the_readme_creates(cluster: Cluster) -> None:
    readme = (ROOT / "README.md").read_text()
    name, key = TOKEN_SECRET
    assert f"kubectl create secret generic {name} --from-literal={key}=" in readme
    for container in [*cluster.teachers(), *cluster.students()]:
        wanted = [AUTH_TOKEN_ENV]
        config, _ = (
            cluster.server_config(container) if container in cluster.teachers() else ({}, {})
        )
        if any(ensemble.get("members") for ensemble in config.get("ensembles", [])):
            wanted.append(REMOTE_TOKEN_ENV)
        for variable in wanted:
            source = container.env().get(variable, {}).get("valueFrom", {}).get("secretKeyRef")
            assert source == {"name": name, "key": key}, (container.name, variable)
    for monitor in cluster.of("ServiceMonitor"):
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["authorization"]["credentials"] == {"name": name, "key": key}


def test_gpu_requests_are_where_the_config_puts_a_model_on_a_gpu(cluster: Cluster) -> None:
    for teacher in cluster.teachers():
        config, env = cluster.server_config(teacher)
        device = str(
            env.get("KDSERVE_SERVER__DEVICE") or (config.get("server") or {}).get("device", "cpu")
        )
        resources = teacher.spec.get("resources", {})
        gpus = resources.get("requests", {}).get(GPU)
        if device.startswith("cuda") and config.get("models"):
            assert gpus and resources["limits"][GPU] == gpus, teacher.name
        else:
            assert gpus is None, f"{teacher.name} asks for a GPU it does not use ({device})"
    for student in cluster.students():
        resources = student.spec["resources"]
        assert resources["requests"][GPU] == resources["limits"][GPU], student.name
        if "torchrun" in student.commands()[0]:
            per_node = (
                flag(student.commands()[0], "--nproc-per-node")
                if ("--nproc-per-node" in student.commands()[0])
                else student.owner["spec"]["nprocPerNode"]
            )
            assert int(per_node) == int(resources["requests"][GPU]), student.name


def test_termination_grace_outlasts_the_drain(cluster: Cluster) -> None:
    for teacher in cluster.teachers():
        config, env = cluster.server_config(teacher)
        grace = float(
            env.get("KDSERVE_SERVER__SHUTDOWN_GRACE_S")
            or (config.get("server") or {}).get("shutdown_grace_s")
            or ServerConfig().shutdown_grace_s
        )
        pre_stop = teacher.spec.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
        # the drain's grace, then up to CLOSE_ANSWER_S for the last answers to go out and as
        # long again for the transports to close (serve.TeacherServer.stop)
        needed = float(pre_stop.get("seconds", 0)) + grace + 2 * CLOSE_ANSWER_S
        period = float(teacher.pod["spec"]["terminationGracePeriodSeconds"])
        assert period > needed, f"{teacher.name}: {period} s to stop, the drain needs {needed}"


def test_students_recipes_exist_and_their_teacher_serves_their_model(cluster: Cluster) -> None:
    for student in cluster.students():
        for argv in student.commands():
            config_path = flag(argv, "--config")
            assert config_path.startswith(IMAGE_SOURCE), config_path
            recipe = yaml.safe_load((ROOT / config_path.removeprefix(IMAGE_SOURCE)).read_text())
            model = recipe["teacher"]["model"]
            host = ADDRESS.match(flag(argv, "--teacher"))
            assert host is not None
            behind = cluster.pods_behind(cluster.get("Service", host["host"]))
            assert all(model in cluster.served_names(t) for t in behind), (config_path, model)
            assert "--auto-resume" in argv and flag(argv, "--output-dir").startswith(
                "/checkpoints/"
            ), student.name
            mounts = {m["mountPath"] for m in student.spec["volumeMounts"]}
            assert "/checkpoints" in mounts and "/data" in mounts, student.name


def startup_budget_s(teacher: Container) -> float:
    """How long the kubelet lets the teacher start before it restarts it."""
    probe = teacher.spec.get("startupProbe") or teacher.spec["readinessProbe"]
    period, failures = probe.get("periodSeconds", 10), probe.get("failureThreshold", 3)
    return float(probe.get("initialDelaySeconds", 0) + period * failures)


def test_students_wait_for_a_teacher_that_is_still_starting(cluster: Cluster) -> None:
    """A student scheduled before its teacher waits as long as the teacher may take to start;
    only then it exits EXIT_TEACHER_UNREACHABLE, which a Job retries, unlike exit 2."""
    for student in cluster.students():
        for argv in student.commands():
            address = ADDRESS.match(flag(argv, "--teacher"))
            assert address is not None
            behind = cluster.pods_behind(cluster.get("Service", address["host"]))
            needed = max(startup_budget_s(t) for t in behind)
            assert float(flag(argv, "--teacher-wait")) >= needed, (student.name, needed)
        policy = student.owner["spec"].get("podFailurePolicy", {"rules": []})
        for rule in policy["rules"]:
            if rule["action"] in ("FailIndex", "FailJob") and "onExitCodes" in rule:
                codes = rule["onExitCodes"]
                assert codes["operator"] == "In", rule
                assert EXIT_TEACHER_UNREACHABLE not in codes["values"], student.name
    for front in cluster.teachers():
        config, _ = cluster.server_config(front)
        members = [m for e in config.get("ensembles", []) for m in e["members"]]
        for member in members:
            address = ADDRESS.match(member)
            if address is None:
                continue  # a local model
            behind = cluster.pods_behind(cluster.get("Service", address["host"]))
            remote = config.get("remote") or {}
            waits = float(remote.get("connect_timeout_s", RemoteConfig().connect_timeout_s))
            assert waits >= max(startup_budget_s(t) for t in behind), (front.name, member)


def test_each_teacher_pod_is_scraped_once(cluster: Cluster) -> None:
    """Every teacher pod's /metrics is one scrape target: each ServiceMonitor selects its
    own teachers' Service (an ensemble member's label narrows its monitor too). The KServe
    overlay has no monitor: KServe owns its Services (README)."""
    targets: list[tuple[str, str, str]] = []
    for monitor in cluster.of("ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"].items()
        for service in cluster.of("Service"):
            if not selector <= service["metadata"].get("labels", {}).items():
                continue
            names = {p.get("name") for p in service["spec"]["ports"]}
            for endpoint in monitor["spec"]["endpoints"]:
                if endpoint["port"] in names:
                    targets += [
                        (pod.name, endpoint["port"], endpoint.get("path", "/metrics"))
                        for pod in cluster.pods_behind(service)
                    ]
    scraped = {target for target in targets}
    assert len(targets) == len(scraped), sorted(t for t in scraped if targets.count(t) > 1)
    if cluster.of("ServiceMonitor"):
        assert {name for name, _, _ in scraped} == {t.name for t in cluster.teachers()}


def test_every_container_runs_the_image_one_file_names(cluster: Cluster) -> None:
    """components/image is the one place to point at a registry: teachers' and students'
    containers all run what it names (the README's one edit reaches every overlay)."""
    component = yaml.safe_load(
        (ROOT / "deploy/k8s/components/image/kustomization.yaml").read_text()
    )
    (image,) = component["images"]
    wanted = f"{image['newName']}:{image['newTag']}"
    for container in cluster.containers():
        assert container.spec["image"] == wanted, container.name


def test_every_volume_can_be_filled(cluster: Cluster) -> None:
    """A claim provisioned empty must be writable by something: ReadOnlyMany only for a
    claim bound to an existing volume or made from a data source."""
    for claim in cluster.of("PersistentVolumeClaim"):
        spec = claim["spec"]
        if spec["accessModes"] == ["ReadOnlyMany"]:
            assert spec.get("volumeName") or spec.get("dataSource") or spec.get("dataSourceRef"), (
                f"{claim['metadata']['name']} is ReadOnlyMany and provisioned empty"
            )


def test_autoscaler_budget_and_monitor_select_the_teachers(cluster: Cluster) -> None:
    rules = [
        rule
        for config in cluster.of("ConfigMap")
        if "config.yaml" in config.get("data", {})
        for rule in yaml.safe_load(config["data"]["config.yaml"]).get("rules", [])
    ]
    exposed = {rule["name"]["as"] for rule in rules}
    for hpa in cluster.of("HorizontalPodAutoscaler"):
        target = cluster.get(
            hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]
        )
        assert pod_templates(target), hpa["metadata"]["name"]
        for metric in hpa["spec"]["metrics"]:
            assert metric["pods"]["metric"]["name"] in exposed, metric
    for budget in cluster.of("PodDisruptionBudget"):
        selector = budget["spec"]["selector"]["matchLabels"].items()
        assert any(selector <= t.labels.items() for t in cluster.teachers()), budget
    for monitor in cluster.of("ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"].items()
        services = [
            s for s in cluster.of("Service") if selector <= s["metadata"].get("labels", {}).items()
        ]
        ports = {p["name"] for s in services for p in s["spec"]["ports"]}
        assert all(e["port"] in ports for e in monitor["spec"]["endpoints"]), (monitor, ports)


def test_ddp_ranks_find_their_master(cluster: Cluster) -> None:
    for student in cluster.students():
        argv = student.commands()[0]
        if "--master-addr" not in argv:
            continue
        host, subdomain = flag(argv, "--master-addr").split(".", 1)
        job = student.owner
        assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
        assert host == f"{job['metadata']['name']}-0", "pod 0's hostname in an Indexed Job"
        assert student.pod["spec"]["subdomain"] == subdomain
        service = cluster.get("Service", subdomain)
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
        assert int(flag(argv, "--master-port")) in {p["port"] for p in service["spec"]["ports"]}
        assert int(flag(argv, "--nnodes")) == job["spec"]["completions"]


def _teacher_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _student_script(objects: list[dict[str, Any]], old: str, new: str) -> None:
    job = next(o for o in objects if o["kind"] == "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert old in args[0]
    args[0] = args[0].replace(old, new)


TYPOS = {
    "teacher port": (
        lambda o: _student_script(o, "kdserve-teacher-grpc:50051", "kdserve-teacher-grpc:50052"),
        test_every_teacher_address_names_a_service_port_and_a_teacher_behind_it,
    ),
    "teacher service": (
        lambda o: _student_script(o, "kdserve-teacher-grpc:", "kdserve-teachers-grpc:"),
        test_every_teacher_address_names_a_service_port_and_a_teacher_behind_it,
    ),
    "probe service": (
        lambda o: _teacher_pod(o)["containers"][0]["readinessProbe"]["grpc"].update(
            service="kdserve.Teacher"
        ),
        test_probes_and_ports_are_those_the_server_listens_on,
    ),
    "probe port": (
        lambda o: _teacher_pod(o)["containers"][0]["readinessProbe"]["grpc"].update(port=50050),
        test_probes_and_ports_are_those_the_server_listens_on,
    ),
    "secret name": (
        lambda o: _teacher_pod(o)["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"].update(
            name="kdserve-tokn"
        ),
        test_the_token_comes_from_the_secret_the_readme_creates,
    ),
    "no GPU": (
        lambda o: _teacher_pod(o)["containers"][0]["resources"]["requests"].pop(GPU),
        test_gpu_requests_are_where_the_config_puts_a_model_on_a_gpu,
    ),
    "short grace": (
        lambda o: _teacher_pod(o).update(terminationGracePeriodSeconds=20),
        test_termination_grace_outlasts_the_drain,
    ),
    "recipe": (
        lambda o: _student_script(o, "set -- kd dkd dist", "set -- kd dkd dsit"),
        test_students_recipes_exist_and_their_teacher_serves_their_model,
    ),
    "short teacher wait": (
        lambda o: _student_script(o, "--teacher-wait 900", "--teacher-wait 60"),
        test_students_wait_for_a_teacher_that_is_still_starting,
    ),
    "unreachable fails the index": (
        lambda o: next(x for x in o if x["kind"] == "Job")["spec"]["podFailurePolicy"]["rules"][1][
            "onExitCodes"
        ].update(values=[2, 69]),
        test_students_wait_for_a_teacher_that_is_still_starting,
    ),
    "image": (
        lambda o: next(x for x in o if x["kind"] == "Job")["spec"]["template"]["spec"][
            "containers"
        ][0].update(image="kdserve"),
        test_every_container_runs_the_image_one_file_names,
    ),
    "metric": (
        lambda o: next(x for x in o if x["kind"] == "HorizontalPodAutoscaler")["spec"]["metrics"][
            0
        ]["pods"]["metric"].update(name="kdserve_pending_image"),
        test_autoscaler_budget_and_monitor_select_the_teachers,
    ),
}


@pytest.mark.parametrize("typo", list(TYPOS))
def test_each_check_catches_its_typo(typo: str) -> None:
    """The sweep overlay passes every check; one typo in it makes its check fail."""
    objects = render(ROOT / "deploy" / "k8s" / "overlays" / "sweep")
    mistake, check = TYPOS[typo]
    mistake(objects)
    with pytest.raises((AssertionError, FileNotFoundError)):
        check(Cluster(objects))
