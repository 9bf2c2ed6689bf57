"""Caption processing of one data source: trigger words, tag shuffling, tag and caption dropout.

A caption is read as comma-separated tags ("sks dog, on a beach, sunset"). Per sample and epoch:
1. caption dropout (`caption_dropout`): the empty prompt, nothing else happens;
2. the first `keep_tags` tags stay in place; with `shuffle_tags` the rest are shuffled;
3. each of the non-kept tags is dropped with probability `tag_dropout`;
4. `caption_prefix` / `caption_suffix` (trigger words) are joined as the first / last tag ("prefix, ...").
Prefix and suffix are fixed, so they are applied once when the captions are read (the text cache keys the
processed captions); steps 2-3 draw from the sample's generator of (seed, epoch, sample), after its crop and
flip draws, so resume and the number of workers change nothing. A source whose captions are random this way
cannot use the prompt-embedding cache (one embedding per caption): engine/setup.py turns that cache off
(or refuses data.cache_text_embeddings=true with a message) -- never a stale embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CaptionRules:
    prefix: str = ""
    suffix: str = ""
    shuffle_tags: bool = False
    keep_tags: int = 0
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0

    @property
    def random_tags(self) -> bool:
        """Whether a caption changes from epoch to epoch (beyond dropping it whole)."""
        return self.shuffle_tags or self.tag_dropout > 0

    def fixed(self, caption: str | None) -> str | None:
        """The caption with the trigger words (applied once, when captions are read)."""
        if caption is None:
            return None
        parts = [p for p in (self.prefix.strip(), caption.strip(), self.suffix.strip()) if p]
        return ", ".join(parts)

    def draw(self, caption: str, generator: torch.Generator) -> str:
        """Steps 2-3 on a caption read with `fixed` (its prefix and suffix are kept in place)."""
        if not self.random_tags:
            return caption
        head = [t.strip() for t in self.prefix.split(",")] if self.prefix.strip() else []
        tail = [t.strip() for t in self.suffix.split(",")] if self.suffix.strip() else []
        tags = [t.strip() for t in caption.split(",")]
        tags = tags[len(head):len(tags) - len(tail)] if tail else tags[len(head):]
        kept, rest = tags[:self.keep_tags], tags[self.keep_tags:]
        if self.shuffle_tags and len(rest) > 1:
            rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
        if self.tag_dropout > 0 and rest:
            keep = (torch.rand(len(rest), generator=generator) >= self.tag_dropout).tolist()
            rest = [t for t, k in zip(rest, keep) if k]
        return ", ".join(t for t in head + kept + rest + tail if t)


def rules_of(options) -> CaptionRules:
    """The CaptionRules of a data config node or source entry (CaptionedImageDataConfig keys)."""
    return CaptionRules(getattr(options, "caption_prefix", "") or "", getattr(options, "caption_suffix", "") or "",
                        bool(getattr(options, "shuffle_tags", False)), int(getattr(options, "keep_tags", 0)),
                        float(getattr(options, "tag_dropout", 0.0)), float(getattr(options, "caption_dropout", 0.0)))
