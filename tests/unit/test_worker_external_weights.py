"""`save_weights_external` on the worker: a PEFT folder in the store, optionally age-encrypted file by file.

One run (tiny Kimi K2) is created, then saved three ways in one tick: as sampler weights, as external weights, and
as external weights encrypted to an age X25519 key and an SSH ed25519 key. Checked:
- the external checkpoint is a committed `external` row whose files are exactly the PEFT adapter
  (`adapter_model.safetensors`, `adapter_config.json` naming the public base model id, rank and alpha), byte-equal
  to the sampler export of the same weights, and one vLLM's adapter check accepts; the result reports its size;
- the encrypted export holds only `<file>.age` files, each of which either identity decrypts (pyrage, the `rage`
  implementation) to the plaintext export's bytes, and which another identity cannot decrypt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyrage
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import ssh, x25519

from api.db.models import CheckpointKind
from contract.checkpoint_store import LocalCheckpointStore
from contract.jobs import CheckpointTarget, ClaimedJob, CreateModelJob, RunLora, SaveWeightsExternalJob
from contract.jobs import SaveWeightsForSamplerJob as SamplerJob
from loom.types import SaveWeightsExternalResponse
from tests.unit.worker_fixtures import fresh_model, run_to_completion
from worker.engine import Engine
from worker.lora.adapter import LORA_ALPHA
from worker.vllm.adapters import check_adapter

BASE = "loom/tiny-kimi-k2"
RUN = "s:train:0"
RANK = 4


def _job(seq: int, payload) -> ClaimedJob:
    return ClaimedJob(
        id=f"{RUN}:{seq}",
        kind=payload.kind,
        owner="alice",
        base_model=BASE,
        model_id=RUN,
        seq_id=seq,
        payload=payload,
        fencing_token=1,
    )


def _target(kind: str, name: str) -> CheckpointTarget:
    return CheckpointTarget(checkpoint_id=f"{kind}/{name}", tinker_path=f"tinker://{RUN}/{kind}/{name}")


def _ssh_pair() -> tuple[str, bytes]:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    return public.decode() + " alice@laptop", private


def _files(uri: str) -> dict[str, bytes]:
    return {
        name: LocalCheckpointStore.verified_file(uri, name).read_bytes() for name in LocalCheckpointStore.files(uri)
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    age_identity = x25519.Identity.generate()
    ssh_public, ssh_private = _ssh_pair()
    engine = Engine(fresh_model("tiny_kimi_k2"), LocalCheckpointStore(tmp_path_factory.mktemp("store")))
    lora = RunLora(rank=RANK, seed=5, train_attn=True, train_mlp=True, train_unembed=True)
    recipients = [str(age_identity.to_public()), ssh_public]
    outcomes = run_to_completion(
        engine,
        [
            _job(0, CreateModelJob(lora=lora)),
            _job(1, SamplerJob(target=_target("sampler_weights", "s"))),
            _job(2, SaveWeightsExternalJob(target=_target("external_weights", "plain"))),
            _job(3, SaveWeightsExternalJob(target=_target("external_weights", "sealed"), age_recipients=recipients)),
        ],
    )
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    return outcomes, [age_identity, ssh.Identity.from_buffer(ssh_private)]


def test_external_weights_are_the_peft_adapter(saved) -> None:
    outcomes, _ = saved
    sampler, plain = outcomes[1].checkpoint, outcomes[2].checkpoint
    assert plain.kind is CheckpointKind.EXTERNAL and plain.tinker_path == f"tinker://{RUN}/external_weights/plain"
    assert outcomes[2].result == SaveWeightsExternalResponse(path=plain.tinker_path, size_bytes=plain.size_bytes)
    files = _files(plain.storage_uri)
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
    assert files == _files(sampler.storage_uri)
    config = json.loads(files["adapter_config.json"])
    assert (config["base_model_name_or_path"], config["r"], config["lora_alpha"]) == (BASE, RANK, LORA_ALPHA)
    assert "lm_head" in config["target_modules"] and "q_a_proj" in config["target_modules"]
    assert plain.size_bytes == sum(len(data) for data in files.values())
    check_adapter(Path(plain.storage_uri.removeprefix("file://")))


def test_encrypted_external_weights_open_with_either_identity_only(saved) -> None:
    outcomes, identities = saved
    plain, sealed = _files(outcomes[2].checkpoint.storage_uri), _files(outcomes[3].checkpoint.storage_uri)
    assert sorted(sealed) == ["adapter_config.json.age", "adapter_model.safetensors.age"]
    for name, data in plain.items():
        assert data not in sealed[f"{name}.age"]
        for identity in identities:
            assert pyrage.decrypt(sealed[f"{name}.age"], [identity]) == data
        with pytest.raises(pyrage.DecryptError):
            pyrage.decrypt(sealed[f"{name}.age"], [x25519.Identity.generate()])
