"""Paralinguistic tags reach Turbo whole through normalisation and chunking, and are removed
for the families that would read them out."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequestError
from gateway.models.families import FAMILIES, MULTILINGUAL, ORIGINAL, TURBO, TURBO_TAGS
from gateway.speech.service import speech_chunks
from gateway.speech.tags import protect, remove_tags, restore

TURBO_FAMILY = FAMILIES[TURBO]


def test_the_tag_set_is_turbos_added_tokens() -> None:
    assert len(TURBO_TAGS) == 19 and len(set(TURBO_TAGS)) == 19
    assert {"[laugh]", "[chuckle]", "[cough]", "[sigh]", "[gasp]", "[clear throat]", "[whispering]"} <= set(TURBO_TAGS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[laugh] that was funny", "[laugh] That was funny."),  # the tag is not capitalised
        ("well… [clear throat] — right", "Well, [clear throat], right."),
        ("Oh [LAUGH] no", "Oh [laugh] no."),
        ("[sigh]", "[sigh]"),
        ("bracketed [note] stays", "Bracketed [note] stays."),
    ],
)
def test_turbo_chunks_keep_tags_whole(text: str, expected: str) -> None:
    assert speech_chunks(text, TURBO_FAMILY, 300) == (expected,)


def test_chunking_never_cuts_inside_a_tag() -> None:
    words = " ".join(["[clear throat] word"] * 40)
    chunks = speech_chunks(words, TURBO_FAMILY, 25)
    assert len(chunks) > 5
    for chunk in chunks:
        assert chunk.count("[") == chunk.count("]") == chunk.count("[clear throat]")
    assert sum(chunk.count("[clear throat]") for chunk in chunks) == 40


@pytest.mark.parametrize("model", [ORIGINAL, MULTILINGUAL])
def test_other_families_get_the_text_without_tags(model: str) -> None:
    assert speech_chunks("Well [chuckle], that [Clear Throat] went fine [laugh].", FAMILIES[model], 300) == (
        "Well, that went fine.",
    )
    with pytest.raises(InvalidRequestError, match="only paralinguistic tags"):
        speech_chunks(" [laugh] [sigh] ", FAMILIES[model], 300)


def test_private_use_characters_in_input_cannot_pose_as_tags() -> None:
    assert restore(protect("a \ue000 b [gasp]", TURBO_TAGS)) == "a  b [gasp]"
    assert remove_tags("no tags here") == "no tags here"
