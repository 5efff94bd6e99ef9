"""Our stoppable decode loops against upstream's own, on dummy weights of each new family:
the same torch RNG state must give exactly the tokens upstream samples (Turbo:
``T3.inference_turbo``; Multilingual: ``T3.inference`` without its alignment analyzer,
which we do not run, see gateway/engine/reference/t3_decode.py)."""

from __future__ import annotations

import pytest
import torch

from gateway.engine.checkpoint.components import chunk_text_ids, load_components, request_t3_cond
from gateway.engine.checkpoint.weights import checkpoint_dir
from gateway.engine.reference.t3_decode import Sampling, generate_turbo_tokens, turbo_speech_tokens
from gateway.models.families import FAMILIES, TOP_K, TURBO
from gateway.settings import Settings
from weights_support import cache_with_shared_weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def turbo(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(2)
    # the suite's dummy checkpoint: written once, not per run (tests/weights_support.py)
    cache = cache_with_shared_weights(tmp_path_factory.mktemp("turbo"))
    settings = Settings(load_format="dummy", models=(TURBO,), cache_dir=cache)
    family = FAMILIES[TURBO]
    return load_components(checkpoint_dir(settings, family), "cpu", family)


# upstream's T3.inference_turbo still passes GPT-2 `past_key_values` (transformers warns; our
# loop passes `cache`, see t3_decode.py)
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_turbo_loop_samples_upstreams_tokens(turbo) -> None:
    text = chunk_text_ids(turbo, "Well [chuckle] that went fine.", "en")
    assert 50274 in text[0].tolist()  # the tag is one added token
    sampling = Sampling(temperature=0.8, top_p=0.95, repetition_penalty=1.2, top_k=TOP_K[TURBO])
    conds = turbo.builtin_conditionals
    torch.manual_seed(7)
    ours = generate_turbo_tokens(turbo.t3, request_t3_cond(conds, 0.0), text, sampling, max_new_tokens=13)
    torch.manual_seed(7)
    upstream = turbo.t3.inference_turbo(
        request_t3_cond(conds, 0.0), text, temperature=0.8, top_k=1000, top_p=0.95, repetition_penalty=1.2, max_gen_len=12
    )
    ours_kept = ours[:, :-1] if ours[0, -1] == turbo.t3.hp.stop_speech_token else ours
    assert ours_kept.tolist() == upstream.tolist()
    assert turbo_speech_tokens(ours).lt(6561).all()


def test_turbo_loop_stops_when_asked(turbo) -> None:
    from gateway.engine.reference.t3_decode import DecodeCancelled

    steps: list[int] = []
    text = chunk_text_ids(turbo, "Hello.", "en")
    with pytest.raises(DecodeCancelled):
        generate_turbo_tokens(
            turbo.t3,
            request_t3_cond(turbo.builtin_conditionals, 0.0),
            text,
            Sampling(top_k=1000),
            max_new_tokens=50,
            should_stop=lambda: len(steps) >= 3,
            on_step=steps.append,
        )
    assert steps == [0, 1, 2]
