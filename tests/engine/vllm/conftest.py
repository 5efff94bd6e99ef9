"""What the vocoder tests share: the random-weight S3Gen (one per test module, one CPU thread:
the test machine's cores are shared), a CFM decoder at toy width (the original's or Turbo's
mean-flow one) and a CFM solve's inputs."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def s3gen():
    from chatterbox.models.s3gen import S3Gen

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield S3Gen().eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cfm_inputs():
    """``cfm_inputs(rows, frames, valid, seed)``: a solve's (noise, mu, mask, spks, cond), row
    ``i`` valid for its first ``valid[i]`` frames."""

    def make(rows: int, frames: int, valid: list[int], seed: int):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(rows, 80, frames, generator=g)
        mu = torch.randn(rows, 80, frames, generator=g)
        cond = torch.randn(rows, 80, frames, generator=g)
        spks = torch.randn(rows, 80, generator=g)
        mask = (torch.arange(frames)[None, :] < torch.tensor(valid)[:, None]).float()[:, None, :]
        return noise, mu, mask, spks, cond

    return make


@pytest.fixture(scope="session")
def tiny_cfm_decoder():
    """``tiny_cfm_decoder(meanflow=False)``: S3Gen's CFM decoder at toy width (same classes,
    causal, 1 + 1 + 1 resnets; upstream's Euler loop fixes the 80 mel bins). Mean-flow: with
    Turbo's (t, r) time mixer, its weights random (upstream's init ignores r)."""

    def make(meanflow: bool = False, seed: int = 3):
        from chatterbox.models.s3gen.decoder import ConditionalDecoder
        from chatterbox.models.s3gen.flow_matching import CausalConditionalCFM

        torch.manual_seed(seed)
        est = ConditionalDecoder(in_channels=320, out_channels=80, causal=True, channels=[16], attention_head_dim=8,
                                 n_blocks=2, num_mid_blocks=1, num_heads=2, act_fn="gelu", meanflow=meanflow)
        if meanflow:
            with torch.no_grad():
                est.time_embed_mixer.weight.normal_(0.0, est.time_embed_mixer.weight.shape[1] ** -0.5)
        return CausalConditionalCFM(in_channels=320, spk_emb_dim=80, estimator=est).eval()

    return make


@pytest.fixture
def item_calls(monkeypatch):
    """Every ``Tensor.item()`` call of the test (on a GPU, each one a host synchronisation)."""
    calls: list[int] = []
    real = torch.Tensor.item

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "item", counting)
    return calls
