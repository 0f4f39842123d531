"""Checkpoints by Hugging Face Hub id (`mega_kernels/hub.py`), read from a Hub cache laid out as huggingface_hub
writes it (models--owner--name/refs/<branch>, snapshots/<commit>/<files>), with local_files_only: no network.
Which weight file is taken, shards, revisions, subfolders, and the errors when the cache lacks a file."""
import os
import shutil
import sys

import huggingface_hub  # noqa: F401  (installed with transformers; the Hub path needs it)
import pytest
import torch

from parity import config_dict, hf, perturb_

import mega_kernels
from mega_kernels import MegaConfig
from mega_kernels.hub import resolve

COMMIT = "1f3e5a7c9b2d4f6e8a0c1e3f5a7b9d1c3e5f7a9b"
OFFLINE = dict(local_files_only=True)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = mega_kernels.MegaForMaskedLM(MegaConfig(**config_dict(**overrides)))
    perturb_(model)
    return model.eval()


def _cache(tmp_path, repo_id, folder, commit=COMMIT, branch="main", subfolder=""):
    """Put the files of `folder` into a Hub cache under tmp_path as snapshot `commit` of `repo_id`, `branch`
    pointing at it; returns the cache folder."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit / subfolder
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return cache


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items())


def test_a_hub_id_loads_from_the_cache(tmp_path):
    model = _model()
    model.save_pretrained(str(tmp_path / "saved"))
    cache = _cache(tmp_path, "mega-test/tiny-mlm", tmp_path / "saved")
    back = mega_kernels.MegaForMaskedLM.from_pretrained("mega-test/tiny-mlm", cache_dir=str(cache), **OFFLINE)
    assert _same_weights(back, model)
    ids = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    config = MegaConfig.from_pretrained("mega-test/tiny-mlm", cache_dir=str(cache), num_labels=4, **OFFLINE)
    assert config.num_labels == 4 and config.hidden_size == model.config.hidden_size
    # overrides still reach the config, and a typo is still a TypeError (not a Hub option)
    back = mega_kernels.MegaForMaskedLM.from_pretrained("mega-test/tiny-mlm", cache_dir=str(cache),
                                                        kernel_backend="reference", **OFFLINE)
    assert back.config.kernel_backend == "reference"
    with pytest.raises(TypeError, match="cache_dri"):
        mega_kernels.MegaForMaskedLM.from_pretrained("mega-test/tiny-mlm", cache_dri=str(cache), **OFFLINE)


def test_safetensors_first_then_pytorch_model_bin(tmp_path):
    first, second = _model(seed=1), _model(seed=2)
    first.save_pretrained(str(tmp_path / "both"), safe_serialization=True)
    second.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    shutil.copy(tmp_path / "bin" / "pytorch_model.bin", tmp_path / "both" / "pytorch_model.bin")
    cache = _cache(tmp_path, "mega-test/both", tmp_path / "both")
    back = mega_kernels.MegaForMaskedLM.from_pretrained("mega-test/both", cache_dir=str(cache), **OFFLINE)
    assert _same_weights(back, first)  # model.safetensors, as read_weights prefers it
    cache = _cache(tmp_path, "mega-test/bin-only", tmp_path / "bin")
    back = mega_kernels.MegaForMaskedLM.from_pretrained("mega-test/bin-only", cache_dir=str(cache), **OFFLINE)
    assert _same_weights(back, second)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_sharded_hub_checkpoint_at_a_revision_and_subfolder(tmp_path, safe):
    ours = _model(tie_word_embeddings=False)
    ours.save_pretrained(str(tmp_path / "ours"))
    hf.MegaForMaskedLM.from_pretrained(str(tmp_path / "ours")).save_pretrained(
        str(tmp_path / "sharded"), max_shard_size="5KB", safe_serialization=safe)
    shards = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors" if safe else ".bin")]
    assert len(shards) >= 3
    other = "0" * 40  # main points at another snapshot, which lacks this one
    cache = _cache(tmp_path, "mega-test/sharded", tmp_path / "sharded", subfolder="mlm")
    _cache(tmp_path, "mega-test/sharded", tmp_path / "ours", commit=other)
    kwargs = dict(cache_dir=str(cache), subfolder="mlm", **OFFLINE)
    back = mega_kernels.MegaForMaskedLM.from_pretrained("mega-test/sharded", revision=COMMIT, **kwargs)
    assert _same_weights(back, ours)
    with pytest.raises(OSError, match="config.json was not found in the local Hub cache"):
        mega_kernels.MegaForMaskedLM.from_pretrained("mega-test/sharded", **kwargs)  # main: no subfolder mlm
    os.remove(cache / "models--mega-test--sharded" / "snapshots" / COMMIT / "mlm" / sorted(shards)[1])
    with pytest.raises(OSError, match=f"{sorted(shards)[1]} \\(a shard listed in"):
        mega_kernels.MegaForMaskedLM.from_pretrained("mega-test/sharded", revision=COMMIT, **kwargs)


def test_what_the_cache_lacks_is_named(tmp_path):
    _model().config.save_pretrained(str(tmp_path / "config-only"))
    cache = _cache(tmp_path, "mega-test/no-weights", tmp_path / "config-only")
    assert MegaConfig.from_pretrained("mega-test/no-weights", cache_dir=str(cache), **OFFLINE).vocab_size > 0
    with pytest.raises(OSError, match="'mega-test/no-weights' is not a local folder, and any of model.safetensors"):
        mega_kernels.MegaForMaskedLM.from_pretrained("mega-test/no-weights", cache_dir=str(cache), **OFFLINE)
    with pytest.raises(OSError, match="'mega-test/absent' is not a local folder, and config.json was not found"):
        mega_kernels.MegaModel.from_pretrained("mega-test/absent", cache_dir=str(cache), **OFFLINE)
    with pytest.raises(OSError, match="revision 'v2'"):
        MegaConfig.from_pretrained("mega-test/no-weights", cache_dir=str(cache), revision="v2", **OFFLINE)


def test_paths_never_go_to_the_hub(tmp_path):
    for path in (str(tmp_path / "missing"), "./missing", "../a/b", "a/b/c", "~/x"):
        with pytest.raises(FileNotFoundError, match="is not a folder holding config.json"):
            resolve(path, weights=True, **OFFLINE)
    with pytest.raises(TypeError, match="unknown option"):
        resolve("owner/name", weights=True, proxies={})


def test_a_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        mega_kernels.MegaModel.from_pretrained("owner/name")
