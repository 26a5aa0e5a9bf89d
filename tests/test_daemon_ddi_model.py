"""daemon/ddi_model.py: hawkBit's own example bodies (tests/data/hawkbit, README there) parsed field by field,
every missing or mistyped field named, and the bodies the device sends checked against hawkBit's OpenAPI."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from pitstop.daemon.ddi_model import (
    MAX_DETAIL_CHARS,
    MAX_DETAILS,
    Artifact,
    Chunk,
    ConfigMode,
    Deployment,
    Execution,
    Finished,
    Handling,
    MaintenanceWindow,
    bundle_artifact,
    config_data_body,
    feedback_body,
    installed_base_body,
    parse_cancel,
    parse_controller_base,
    parse_deployment,
    parse_json,
    parse_sleep,
)
from pitstop.daemon.errors import DdiError

DATA = Path(__file__).parent / "data" / "hawkbit"
CDN = "https://link-to-cdn.com/api/v1/TENANT_ID/download/controller/CONTROLLER_ID/softwaremodules"
API = "https://management-api.host.com/TENANT_ID/controller/v1/CONTROLLER_ID"


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DATA / name).read_text())
    return doc


# -- hawkBit's OpenAPI (the subset our bodies use), checked without a schema library ------------------------

OPENAPI = load("ddi_openapi_subset.json")


def check_schema(value: Any, schema: dict[str, Any], path: str = "$") -> None:
    """Assert `value` matches the OpenAPI schema, and sends no property the schema does not define."""
    if "$ref" in schema:
        schema = OPENAPI["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"{path}: expected an object, got {value!r}"
        for key in schema.get("required", []):
            assert key in value, f"{path}: required field {key!r} missing"
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                check_schema(item, props[key], f"{path}.{key}")
            else:
                assert extra is not None, f"{path}: {key!r} is not a field of this DDI body"
                check_schema(item, extra, f"{path}.{key}")
    elif kind == "array":
        assert isinstance(value, list), f"{path}: expected an array"
        for i, item in enumerate(value):
            check_schema(item, schema["items"], f"{path}[{i}]")
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: expected an integer"
    elif kind == "string":
        assert isinstance(value, str), f"{path}: expected a string"
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"


def request_schema(method: str, path: str) -> dict[str, Any]:
    schema: dict[str, Any] = OPENAPI["paths"][path][method.lower()]["requestBody"]
    return schema


FEEDBACK_PATH = "/{tenant}/controller/v1/{controllerId}/deploymentBase/{actionId}/feedback"
CANCEL_FEEDBACK_PATH = "/{tenant}/controller/v1/{controllerId}/cancelAction/{actionId}/feedback"
CONFIG_PATH = "/{tenant}/controller/v1/{controllerId}/configData"
INSTALLED_PATH = "/{tenant}/controller/v1/{controllerId}/installedBase"


# -- controller base ----------------------------------------------------------------------------------------


def test_controller_base_example() -> None:
    base = parse_controller_base(load("controller_base.json"))
    assert base.sleep_s == 12 * 3600
    assert base.deployment_href == f"{API}/deploymentBase/5?c=-2127183556"
    assert base.installed_href == f"{API}/installedBase/4"
    assert base.config_data_href == f"{API}/configData"
    assert base.cancel_href is None
    assert base.confirmation_href is None


def test_controller_base_cancel() -> None:
    base = parse_controller_base(load("controller_base_cancel.json"))
    assert base.sleep_s == 300
    assert base.cancel_href == f"{API}/cancelAction/1234"
    assert base.deployment_href is None and base.config_data_href is None and base.installed_href is None


def test_controller_base_minimal_and_unknown_fields() -> None:
    base = parse_controller_base({"unknownProperty": "test", "links": []})
    assert base.sleep_s is None and base.deployment_href is None
    base = parse_controller_base({"config": {"polling": {}}, "_links": {"confirmationBase": {"href": "x"},
                                                                         "somethingNew": {"href": "y"}}})
    assert base.sleep_s is None and base.confirmation_href == "x"


@pytest.mark.parametrize(("doc", "needle"), [
    # hawkBit's own model tests use "123"; the server never sends it and this client refuses it.
    ({"config": {"polling": {"sleep": "123"}}}, "config.polling.sleep"),
    ({"config": {"polling": {"sleep": ["123"]}}}, "config.polling.sleep is list"),
    ({"config": {"polling": "00:05:00"}}, "config.polling is str"),
    ({"config": []}, "config is list"),
    ({"_links": {"deploymentBase": {}}}, "missing field _links.deploymentBase.href"),
    ({"_links": {"cancelAction": "https://x"}}, "_links.cancelAction is not an object"),
    ({"_links": []}, "_links is list"),
])
def test_controller_base_refused(doc: dict[str, Any], needle: str) -> None:
    with pytest.raises(DdiError, match=r"^controller base: ") as e:
        parse_controller_base(doc)
    assert needle in str(e.value)


@pytest.mark.parametrize(("text", "seconds"), [
    ("00:05:00", 300), ("12:00:00", 43200), ("23:59:59", 86399), ("00:00:30", 30), ("00:00:00", 0),
    ("36:00:00", 129600),
    # Java's Duration.toString(), which hawkBit sends for a day or more.
    ("PT24H", 86400), ("PT36H30M", 131400), ("PT30S", 30), ("PT0.5S", 0.5), ("P1DT2H", 93600), ("P2D", 172800),
])
def test_parse_sleep(text: str, seconds: float) -> None:
    assert parse_sleep(text) == seconds


@pytest.mark.parametrize("text", ["123", "", "5:00", "1:00:00", "00:60:00", "00:00:60", "PT", "P", "P1DT",
                                  "PT-5S", "00:05:00 ", "5 min", "PT5X"])
def test_parse_sleep_refused(text: str) -> None:
    with pytest.raises(ValueError, match="HH:MM:SS"):
        parse_sleep(text)


# -- deploymentBase ------------------------------------------------------------------------------------------


def test_deployment_example_field_by_field() -> None:
    dep = parse_deployment(load("deployment_base.json"))
    assert dep.action_id == "8"
    assert dep.download is Handling.FORCED and dep.update is Handling.FORCED
    assert dep.maintenance_window is MaintenanceWindow.AVAILABLE
    assert [(c.part, c.version, c.name) for c in dep.chunks] == [
        ("jvm", "1.0.75", "oneapp runtime"), ("os", "1.0.79", "one Firmware"), ("bApp", "1.0.91", "oneapplication")]
    assert dep.chunks[0] == Chunk(
        part="jvm", version="1.0.75", name="oneapp runtime", metadata=(),
        artifacts=(
            Artifact(filename="binary.tgz", size=13,
                     sha256="b3a04740a19e36057ccf258701922f3cd2f1a880536be53a3ca8d50f6b615975",
                     sha1="986a1ade8b8a2f758ce951340cc5e21335cc2a00", md5="d04440e6533863247655ac5fd4345bcc",
                     download_url=f"{CDN}/23/filename/binary.tgz"),
            Artifact(filename="file.signature", size=13,
                     sha256="b3a04740a19e36057ccf258701922f3cd2f1a880536be53a3ca8d50f6b615975",
                     sha1="986a1ade8b8a2f758ce951340cc5e21335cc2a00", md5="d04440e6533863247655ac5fd4345bcc",
                     download_url=f"{CDN}/23/filename/file.signature"),
        ))
    assert dep.chunks[2].metadata == (("aMetadataKey", "Metadata value as defined in software module"),)
    assert len(dep.artifacts) == 6
    assert all(a.download_url.startswith("https://") for a in dep.artifacts)


def test_deployment_example_has_no_bundle_to_pick() -> None:
    dep = parse_deployment(load("deployment_base.json"))
    with pytest.raises(DdiError, match=r"deployment 8: no \.pitb artifact among 6 .*cannot tell which one"):
        bundle_artifact(dep)


def test_pitstop_deployment_picks_the_bundle() -> None:
    dep = parse_deployment(load("deployment_pitstop.json"))
    assert dep.action_id == "5" and dep.maintenance_window is None
    assert dep.chunks[0].metadata == (("compatible", "pitstop-reference"),)
    art = bundle_artifact(dep)
    assert art.filename == "reference-2.0.0.pitb"
    assert art.download_url == f"{API}/softwaremodules/24/artifacts/reference-2.0.0.pitb"


def test_window_closed_deployment_uses_http_link_when_alone() -> None:
    dep = parse_deployment(load("deployment_window_closed.json"))
    assert (dep.download, dep.update, dep.maintenance_window) == (
        Handling.FORCED, Handling.SKIP, MaintenanceWindow.UNAVAILABLE)
    assert bundle_artifact(dep).download_url.startswith("http://management-api.host.com/")


def _with_artifacts(names: list[str]) -> Deployment:
    art = load("artifact.json")
    doc = load("deployment_pitstop.json")
    arts = []
    for n in names:
        a = copy.deepcopy(art)
        a["filename"] = n
        arts.append(a)
    doc["deployment"]["chunks"] = [{"part": "os", "version": "1", "name": "x", "artifacts": arts[:1]},
                                   {"part": "app", "version": "1", "name": "y", "artifacts": arts[1:]}]
    return parse_deployment(doc)


def test_bundle_choice() -> None:
    assert bundle_artifact(_with_artifacts(["binaryFile"])).filename == "binaryFile"    # the only artifact
    assert bundle_artifact(_with_artifacts(["a.sig", "b.pitb"])).filename == "b.pitb"    # across chunks
    with pytest.raises(DdiError, match=r"more than one bundle artifact \(a\.pitb, b\.pitb\)"):
        bundle_artifact(_with_artifacts(["a.pitb", "b.pitb"]))
    with pytest.raises(DdiError, match="no artifact to install"):
        bundle_artifact(_with_artifacts([]))
    with pytest.raises(DdiError, match=r"no \.pitb artifact among 2 \(a\.tgz, b\.tgz\)"):
        bundle_artifact(_with_artifacts(["a.tgz", "b.tgz"]))


def test_artifact_example_alone() -> None:
    doc = load("deployment_pitstop.json")
    doc["deployment"]["chunks"][0]["artifacts"] = [load("artifact.json")]
    art = bundle_artifact(parse_deployment(doc))
    assert art == Artifact(filename="binaryFile", size=11,
                           sha256="c51368bf045803b429a67bdf04539a373d9fb8caa310fe0431265e6871b4f07a",
                           sha1="e4e667b70ff652cb9d9c8a49f141bd68e06cec6f", md5="13793b0e3a7830ed685d3ede7ff93048",
                           download_url=f"{CDN}/40/filename/binaryFile")


def _mutated(change: Any) -> dict[str, Any]:
    doc = load("deployment_base.json")
    change(doc)
    return doc


def _art(doc: dict[str, Any]) -> dict[str, Any]:
    a: dict[str, Any] = doc["deployment"]["chunks"][1]["artifacts"][0]
    return a


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("id"), "missing field id"),
    (lambda d: d.pop("deployment"), "missing field deployment"),
    (lambda d: d["deployment"].pop("chunks"), "missing field deployment.chunks"),
    (lambda d: d["deployment"].pop("download"), "missing field deployment.download"),
    (lambda d: d["deployment"].pop("update"), "missing field deployment.update"),
    (lambda d: d["deployment"]["chunks"][0].pop("part"), "missing field deployment.chunks[0].part"),
    (lambda d: d["deployment"]["chunks"][2].pop("version"), "missing field deployment.chunks[2].version"),
    (lambda d: d["deployment"]["chunks"][2].pop("name"), "missing field deployment.chunks[2].name"),
    (lambda d: _art(d).pop("filename"), "missing field deployment.chunks[1].artifacts[0].filename"),
    (lambda d: _art(d).pop("size"), "missing field deployment.chunks[1].artifacts[0].size"),
    (lambda d: _art(d).pop("_links"), "missing field deployment.chunks[1].artifacts[0]._links.download"),
    (lambda d: _art(d)["_links"]["download"].pop("href"),
     "missing field deployment.chunks[1].artifacts[0]._links.download.href"),
    (lambda d: d["deployment"]["chunks"][2]["metadata"][0].pop("value"),
     "missing field deployment.chunks[2].metadata[0].value"),
    (lambda d: d.update(id=["8"]), "field id is list, expected a string"),
    (lambda d: d.update(id="8/../9"), "field id is not an action id"),
    (lambda d: d.update(id=""), "field id is not an action id"),
    (lambda d: _art(d).update(size="13"), "field deployment.chunks[1].artifacts[0].size is str, expected an integer"),
    (lambda d: _art(d).update(size=True), "field deployment.chunks[1].artifacts[0].size is bool"),
    (lambda d: _art(d).update(size=-1), "deployment.chunks[1].artifacts[0].size is negative"),
    (lambda d: _art(d)["hashes"].update(sha256="abc"), "deployment.chunks[1].artifacts[0].hashes.sha256 is not 64 hex"),
    (lambda d: _art(d)["hashes"].update(sha1=1), "hashes.sha1 is int, expected a string"),
    (lambda d: d["deployment"].update(download="sometimes"),
     "deployment.download is 'sometimes', expected skip|attempt|forced"),
    (lambda d: d["deployment"].update(maintenanceWindow="open"),
     "deployment.maintenanceWindow is 'open', expected available|unavailable"),
    (lambda d: d["deployment"].update(chunks={}), "field deployment.chunks is dict, expected an array"),
    (lambda d: d["deployment"]["chunks"].append("os"), "deployment.chunks[3] is not an object"),
    (lambda d: d["deployment"]["chunks"][0]["artifacts"].append(7),
     "deployment.chunks[0].artifacts[2] is not an object"),
])
def test_deployment_refused_naming_the_field(change: Any, message: str) -> None:
    with pytest.raises(DdiError) as e:
        parse_deployment(_mutated(change))
    assert str(e.value).startswith("deployment: ")
    assert message in str(e.value)


def test_deployment_optional_parts() -> None:
    def strip(d: dict[str, Any]) -> None:
        d["deployment"].pop("maintenanceWindow")
        d.pop("actionHistory")
        d.pop("id")
        d["id"] = 8                        # a number from a server other than hawkBit
        d["deployment"]["chunks"][2].pop("metadata")
        d["deployment"]["chunks"][1].pop("artifacts")
        d["deployment"]["chunks"][0]["artifacts"][0].pop("hashes")
        d["deployment"]["chunks"][0]["artifacts"][0]["_links"].pop("download")
        d["deployment"]["newField"] = {"x": 1}
    dep = parse_deployment(_mutated(strip))
    assert dep.action_id == "8" and dep.maintenance_window is None
    assert dep.chunks[1].artifacts == () and dep.chunks[2].metadata == ()
    first = dep.chunks[0].artifacts[0]
    assert (first.sha256, first.sha1, first.md5) == (None, None, None)
    assert first.download_url == f"{CDN}/23/filename/binary.tgz"    # from download-http, the one left


def test_https_download_link_preferred() -> None:
    doc = load("deployment_pitstop.json")
    links = doc["deployment"]["chunks"][0]["artifacts"][0]["_links"]
    links["download-http"] = {"href": "http://plain.example/b.pitb"}
    https = f"{API}/softwaremodules/24/artifacts/reference-2.0.0.pitb"
    assert bundle_artifact(parse_deployment(doc)).download_url == https
    links.pop("download")
    assert bundle_artifact(parse_deployment(doc)).download_url == "http://plain.example/b.pitb"


def test_hashes_normalized_to_lower_case() -> None:
    doc = load("deployment_base.json")
    doc["deployment"]["chunks"][0]["artifacts"][0]["hashes"]["sha1"] = "986A1ADE8B8A2F758CE951340CC5E21335CC2A00"
    assert parse_deployment(doc).chunks[0].artifacts[0].sha1 == "986a1ade8b8a2f758ce951340cc5e21335cc2a00"


# -- cancelAction ----------------------------------------------------------------------------------------


def test_cancel_example_with_unknown_property() -> None:
    cancel = parse_cancel(load("cancel_action.json"))
    assert (cancel.action_id, cancel.stop_id) == ("1234", "1234")


def test_cancel_without_id_and_refused() -> None:
    assert parse_cancel({"cancelAction": {"stopId": "11"}}).action_id == "11"
    with pytest.raises(DdiError, match=r"^cancel action: missing field cancelAction$"):
        parse_cancel({"id": "1"})
    with pytest.raises(DdiError, match=r"missing field cancelAction\.stopId"):
        parse_cancel({"id": "1", "cancelAction": {}})
    # hawkBit's model test of a wrong data type
    with pytest.raises(DdiError, match="field id is list"):
        parse_cancel({"id": ["1234"], "cancelAction": {"stopId": "1234"}})


def test_parse_json() -> None:
    assert parse_json(b'{"a": 1}', "GET /x") == {"a": 1}
    with pytest.raises(DdiError, match="GET /x: the update server sent malformed JSON"):
        parse_json(b'{"config": ', "GET /x")
    with pytest.raises(DdiError, match="malformed JSON"):
        parse_json(b"\xff\xfe{}", "GET /x")
    with pytest.raises(DdiError, match="JSON that is not an object"):
        parse_json(b"[1, 2]", "GET /x")


# -- bodies sent ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("execution", list(Execution))
@pytest.mark.parametrize("finished", list(Finished))
def test_feedback_body_every_status(execution: Execution, finished: Finished) -> None:
    if execution is Execution.CLOSED and finished is Finished.NONE:
        with pytest.raises(ValueError, match="closed action needs finished=success or failure"):
            feedback_body(execution, finished, timestamp_ms=1)
        return
    body = feedback_body(execution, finished, timestamp_ms=1627997501890)
    assert body == {"timestamp": 1627997501890,
                    "status": {"execution": execution.value, "result": {"finished": finished.value}, "details": []}}
    check_schema(body, request_schema("POST", FEEDBACK_PATH))
    check_schema(body, request_schema("POST", CANCEL_FEEDBACK_PATH))


def test_feedback_body_all_fields() -> None:
    body = feedback_body(Execution.PROCEEDING, Finished.NONE, timestamp_ms=1627997501890, progress=(2, 5),
                         details=["Some feedback"], code=200)
    # the values of hawkBit's own schema examples, in the shape of DdiActionFeedback
    assert body == {"timestamp": 1627997501890,
                    "status": {"execution": "proceeding",
                               "result": {"finished": "none", "progress": {"cnt": 2, "of": 5}},
                               "details": ["Some feedback"], "code": 200}}
    check_schema(body, request_schema("POST", FEEDBACK_PATH))


@pytest.mark.parametrize("progress", [(-1, 5), (6, 5), (0, 0)])
def test_feedback_progress_refused(progress: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="progress"):
        feedback_body(Execution.PROCEEDING, Finished.NONE, timestamp_ms=1, progress=progress)


def test_feedback_details_cut_to_hawkbit_limits() -> None:
    long = "x" * (MAX_DETAIL_CHARS + 100)
    body = feedback_body(Execution.CLOSED, Finished.FAILURE, timestamp_ms=1, details=[long, "é" * MAX_DETAIL_CHARS])
    first, second = body["status"]["details"]
    assert len(first) == MAX_DETAIL_CHARS and first.endswith("…")
    assert second == "é" * MAX_DETAIL_CHARS
    lines = [f"line {i}" for i in range(60)]
    details = feedback_body(Execution.CLOSED, Finished.FAILURE, timestamp_ms=1, details=lines)["status"]["details"]
    assert len(details) == MAX_DETAILS
    assert details[0] == "(11 earlier lines omitted)"
    assert details[1:] == lines[11:]
    exact = [f"l{i}" for i in range(MAX_DETAILS)]
    body = feedback_body(Execution.CLOSED, Finished.SUCCESS, timestamp_ms=1, details=exact)
    assert body["status"]["details"] == exact


def test_config_data_body_matches_hawkbit_example() -> None:
    example = load("config_data.json")
    body = config_data_body({"VIN": "JH4TB2H26CC000000", "hwRevision": "2"})
    assert body == example
    check_schema(body, request_schema("PUT", CONFIG_PATH))
    assert config_data_body({"a": "1"}, ConfigMode.REMOVE) == {"mode": "remove", "data": {"a": "1"}}
    for mode in ConfigMode:
        check_schema(config_data_body({"a": ""}, mode), request_schema("PUT", CONFIG_PATH))
    with pytest.raises(ValueError, match="at least one attribute"):
        config_data_body({})
    with pytest.raises(ValueError, match="values strings"):
        config_data_body({"slot": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-empty strings"):
        config_data_body({"": "x"})


def test_installed_base_body() -> None:
    body = installed_base_body("linux", "1.2.3")
    assert body == {"name": "linux", "version": "1.2.3"}
    check_schema(body, request_schema("PUT", INSTALLED_PATH))
    with pytest.raises(ValueError):
        installed_base_body("linux", "")


def test_schema_checker_catches_mistakes() -> None:
    """The checker itself: a body with a stray field, a missing field or a wrong enum must fail it."""
    schema = request_schema("POST", FEEDBACK_PATH)
    good = feedback_body(Execution.CLOSED, Finished.SUCCESS, timestamp_ms=1)
    for bad in ({**good, "time": "2023"}, {"timestamp": 1},
                {"timestamp": 1, "status": {**good["status"], "execution": "done"}},
                {"timestamp": "1", "status": good["status"]}):
        with pytest.raises(AssertionError):
            check_schema(bad, schema)
