"""What made a result layer, kept with the layer so it can be made again.

Every variation layer gets a ``FillRecord``: the request's parameters, the seed that layer
came from, and the box it covers. The editors store records their own way (Krita: a document
annotation keyed by layer id, saved in the .kra; GIMP: a parasite on the layer) as the JSON
``to_json`` writes; ``from_json`` reads what any version wrote and refuses what it cannot use.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from .geometry import Box
from .messages import FillOptions, Margins

RECORD_VERSION = 1
ANNOTATION_TYPE = "genfill"
"""Krita's annotation type (and GIMP's parasite name) for the records."""


@dataclass(frozen=True)
class FillRecord:
    """One result layer's parameters. ``engine`` and ``model`` are what the server used;
    ``seed`` is this layer's; ``box`` is where it lies in canvas pixels (after any expand)."""

    prompt: str
    negative_prompt: str
    mode: str
    engine: str
    model: str | None
    seed: int
    steps: int | None
    strength: float | None
    box: Box
    source: str = "layer"
    source_layer: str = ""
    expand: Margins = field(default_factory=Margins)

    @classmethod
    def of(cls, options: FillOptions, *, engine: str, model: str | None, seed: int, box: Box, source_layer: str = "") -> FillRecord:
        return cls(options.prompt, options.negative_prompt, options.mode, engine, model, int(seed), options.steps,
                   options.strength, Box(*box), options.source, source_layer, options.expand)

    def options(self, *, seed: int | None, variations: int) -> FillOptions:
        """The request again: ``seed=None`` for new seeds, this record's ``seed`` to repeat it."""
        return FillOptions(
            prompt=self.prompt, negative_prompt=self.negative_prompt, mode=self.mode, engine=self.engine or None,
            model=self.model, strength=self.strength, variations=variations, seed=seed, steps=self.steps,
            source=self.source, expand=self.expand,
        )

    def describe(self) -> str:
        prompt = " ".join(self.prompt.split()) or "(no prompt)"
        return f"{prompt} | {self.mode}, {self.engine}{' / ' + self.model if self.model else ''}, seed {self.seed}"


def to_json(records: dict[str, FillRecord]) -> str:
    """``{layer id: record}`` as the JSON the editors store."""
    layers = {}
    for key, record in records.items():
        data = asdict(record)
        data["box"] = list(record.box)
        layers[key] = data
    return json.dumps({"version": RECORD_VERSION, "layers": layers}, sort_keys=True)


def from_json(text: str | bytes) -> dict[str, FillRecord]:
    """Reads ``to_json``'s output; an empty or foreign text gives ``{}``; a damaged record is
    skipped (one bad layer must not hide the others)."""
    try:
        data = json.loads(text or "{}")
    except ValueError:
        return {}
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict):
        return {}
    records = {}
    for key, item in layers.items():
        try:
            records[key] = FillRecord(
                prompt=str(item["prompt"]), negative_prompt=str(item.get("negative_prompt", "")), mode=str(item["mode"]),
                engine=str(item.get("engine") or ""), model=item.get("model"), seed=int(item["seed"]),
                steps=item.get("steps"), strength=item.get("strength"), box=Box(*(int(v) for v in item["box"])),
                source=str(item.get("source", "layer")), source_layer=str(item.get("source_layer", "")),
                expand=Margins(**item.get("expand", {})),
            )
        except (KeyError, TypeError, ValueError):
            continue
    return records


def with_seed(record: FillRecord, seed: int) -> FillRecord:
    return replace(record, seed=int(seed))


PROMPT_HISTORY_SIZE = 20


def remember_prompt(history: list[str], prompt: str, *, size: int = PROMPT_HISTORY_SIZE) -> list[str]:
    """The prompt history with ``prompt`` first: no repeats, no blanks, at most ``size``."""
    if not prompt.strip():
        return list(history[:size])
    return [prompt, *(item for item in history if item != prompt)][:size]
