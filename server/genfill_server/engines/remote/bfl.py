"""Black Forest Labs' Flux Fill and Expand API as a genfill engine.

``POST {base_url}/v1/flux-pro-1.0-fill`` with JSON ``image`` and ``mask`` (base64 PNGs, the
mask white where the image may change), ``prompt``, ``seed``, ``steps``, ``guidance``,
``output_format=png``, ``safety_tolerance`` and ``prompt_upsampling``; header ``x-key``. The
answer's ``id`` and ``polling_url`` name a task, polled with ``GET polling_url`` until its
``status`` is ``Ready`` (``result.sample`` is a signed URL of the image, fetched without the
key), ``Error``, ``Request Moderated`` or ``Content Moderated``.

``mode="expand"`` goes to ``/v1/flux-pro-1.0-expand`` with the known part of the crop and the
``top``/``bottom``/``left``/``right`` margins around it, where the known part is a rectangle
(a grown canvas's always is); otherwise, and for every other mode, to the fill endpoint.
One task makes one image: each variation is one task with its own seed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from genfill.protocol import ErrorCode, Mode

from ..base import (
    DeviceKind,
    EngineCapabilities,
    EngineError,
    EngineJob,
    StepCallback,
)
from ..prefill import prefill
from ..spec import EngineSpec, ProviderContext
from ._common import (
    Call,
    RemoteEngine,
    RemoteSettings,
    all_of,
    b64_png,
    boolean,
    decode_image,
    edit_area,
    number,
    offer,
    parse_settings,
    run_job,
    same_origin,
    size_of,
)

NAME = "bfl"
MODELS = ("flux-pro-1.0-fill",)
OPTIONS = {
    "safety_tolerance": (2, number(0, 6, int)),
    "prompt_upsampling": (False, boolean),
}
TRUSTED_HOST_SUFFIX = ".bfl.ai"
"""Polling URLs may name a regional host (``api.us1.bfl.ai``): the key goes to those, over
https, and to the configured host only."""
STEPS = (15, 50)
GUIDANCE = (1.5, 100.0)
_MAX_MARGIN = 2048
_NOT_FOUND_POLLS = 5
"""A task just made may not be found for a poll or two; past this many it is lost."""

CAPABILITIES = EngineCapabilities(
    prompt=True,
    soft_masks=False,
    options=frozenset({"steps", "guidance"}),
    max_variations=4,
    native_size=1024,
    device_kind=DeviceKind.REMOTE,
)


def settings_from(table, environ=None) -> RemoteSettings:
    return parse_settings(
        NAME, table, base_url="https://api.bfl.ai", key_env="BFL_API_KEY", models=MODELS, options=OPTIONS, environ=environ
    )


def provide(context: ProviderContext) -> Iterable[EngineSpec]:
    """The ``bfl`` engine, only where the server's configuration switched it on."""
    return offer(
        context,
        BFLEngine,
        settings_from,
        description="Black Forest Labs Flux Fill and Expand: the context crop is sent to {host}",
        architecture="flux",
    )

def known_rectangle(selection: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(top, bottom, left, right)`` margins around the known part of ``selection`` (0
    keeps), where that part is a rectangle with everything around it selected; else ``None``."""
    known = selection == 0
    if not known.any() or known.all():
        return None
    rows, columns = np.flatnonzero(known.any(axis=1)), np.flatnonzero(known.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
    if not known[top:bottom, left:right].all():
        return None
    height, width = selection.shape
    return int(top), int(height - bottom), int(left), int(width - right)


class BFLEngine(RemoteEngine):
    name = NAME
    capabilities = CAPABILITIES

    def run(self, job: EngineJob, on_step: StepCallback) -> list[np.ndarray]:
        _check_range("steps", job.options.steps, STEPS)
        _check_range("guidance", job.options.guidance, GUIDANCE)
        assert self.settings.key is not None
        return run_job(
            self.settings,
            self._limit,
            on_step,
            lambda call: self._fill(call, job),
            auth_headers={"x-key": self.settings.key.reveal(), "accept": "application/json"},
        )

    def task(self, job: EngineJob, seed: int) -> tuple[str, dict[str, Any]]:
        """The endpoint and JSON body of one variation's task."""
        options = job.options
        body: dict[str, Any] = {"seed": int(seed), "output_format": "png", **self.settings.options}
        if options.prompt.strip():
            body["prompt"] = options.prompt.strip()
        if options.steps is not None:
            body["steps"] = options.steps
        if options.guidance is not None:
            body["guidance"] = options.guidance
        margins = known_rectangle(job.selection) if options.mode is Mode.EXPAND else None
        expand = self.model.removesuffix("-fill") + "-expand" if self.model.endswith("-fill") else None
        if margins is not None and expand is not None and all(0 <= m <= _MAX_MARGIN for m in margins):
            top, bottom, left, right = margins
            height, width = job.selection.shape
            body |= {"image": b64_png(job.image[top : height - bottom, left : width - right]),
                     "top": top, "bottom": bottom, "left": left, "right": right}
            return expand, body
        image = job.image
        if options.mode is Mode.REMOVE:
            # What is removed is not sent at all.
            image = prefill(image, job.selection, str(options.mode))
        mask = np.where(edit_area(job.denoise_mask), 255, 0).astype(np.uint8)
        body |= {"image": b64_png(image), "mask": b64_png(mask)}
        return self.model, body

    async def _fill(self, call: Call, job: EngineJob) -> list[np.ndarray]:
        count = len(job.seeds)
        done = [0.0] * count
        call.report(0, 100 * count)

        def progress(index: int, fraction: float) -> None:
            done[index] = max(done[index], min(1.0, fraction))
            call.report(round(100 * sum(done)))

        async def one(index: int, seed: int) -> np.ndarray:
            endpoint, body = self.task(job, seed)
            async with call.slot():
                image = await self._run_task(call, endpoint, body, size_of(job.image), lambda f: progress(index, f))
            progress(index, 1.0)
            return image

        return await all_of(one(index, seed) for index, seed in enumerate(job.seeds))

    async def _run_task(self, call: Call, endpoint: str, body: dict, size, progress) -> np.ndarray:
        base = self.settings.base_url
        response = await call.request("POST", f"{base}/v1/{endpoint}", json=body)
        task = _object(call, response)
        task_id = task.get("id")
        polling_url = task.get("polling_url") or (task_id and f"{base}/v1/get_result?id={task_id}")
        if not isinstance(polling_url, str) or not same_origin(polling_url, base, TRUSTED_HOST_SUFFIX):
            # The key goes with every poll: never to a host the configuration did not name.
            raise call.unexpected("a polling URL on another host")
        not_found = 0
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            answer = _object(call, await call.request("GET", polling_url))
            status = answer.get("status")
            if status == "Ready":
                result = answer.get("result")
                sample = result.get("sample") if isinstance(result, dict) else None
                return await self._fetch(call, sample, size)
            if status == "Pending":
                if isinstance(answer.get("progress"), (int, float)):
                    progress(float(answer["progress"]))
                continue
            if status == "Task not found":
                not_found += 1
                if not_found > _NOT_FOUND_POLLS:
                    raise EngineError(ErrorCode.ENGINE_FAILED, f"{self.settings.host} lost the task; try again")
                continue
            if status in ("Request Moderated", "Content Moderated"):
                what = "the request" if status == "Request Moderated" else "the image it made"
                raise EngineError(ErrorCode.MODERATED, f"Black Forest Labs' safety filter refused {what} ({status})")
            if status == "Error":
                raise EngineError(ErrorCode.ENGINE_FAILED, f"{self.settings.host} failed to make the image; try again")
            raise call.unexpected(f"task status {str(status)[:40]!r}")

    async def _fetch(self, call: Call, sample: Any, size) -> np.ndarray:
        if not isinstance(sample, str):
            raise call.unexpected("a finished task without an image")
        if urlsplit(sample).scheme != "https" and not same_origin(sample, self.settings.base_url):
            raise call.unexpected("an image URL that is not https")
        # A signed download link: the key is not sent with it.
        response = await call.request("GET", sample, authenticated=False)
        return decode_image(call, response.content, size)


def _object(call: Call, response) -> dict:
    try:
        body = response.json()
    except ValueError:
        raise call.unexpected("an answer that is not JSON") from None
    if not isinstance(body, dict):
        raise call.unexpected("an answer that is not a JSON object")
    return body


def _check_range(name: str, value: float | None, bounds: tuple[float, float]) -> None:
    if value is not None and not bounds[0] <= value <= bounds[1]:
        raise EngineError(
            ErrorCode.INVALID_REQUEST, f"the bfl engine takes {name} from {bounds[0]:g} to {bounds[1]:g}, not {value:g}"
        )
