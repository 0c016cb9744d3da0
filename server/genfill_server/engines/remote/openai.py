"""OpenAI image edits (GPT Image models) as a genfill engine.

``POST {base_url}/v1/images/edits``, multipart: ``image`` (PNG of the context crop), ``mask``
(PNG of the same size whose alpha is 0 where the image may change), ``prompt``, ``model``,
``n``, ``size``, ``output_format=png`` and the server's configured ``quality``, ``background``
and ``input_fidelity``; ``Authorization: Bearer KEY``. The answer's ``data[].b64_json`` are the
images. With ``stream`` on, each variation is one streamed request whose
``image_edit.partial_image`` server-sent events become the job's previews and whose
``image_edit.completed`` event carries the image.

GPT Image models take three sizes (1024x1024, 1536x1024, 1024x1536): the crop goes at the one
nearest its aspect ratio and comes back to the crop's size; the composite keeps every pixel
outside the selection as it was. No seed is sent: the API takes none.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx
import numpy as np
from genfill import fill
from genfill.fill import Size
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
    boolean,
    choice,
    decode_b64,
    edit_area,
    number,
    offer,
    parse_settings,
    png_bytes,
    preview_of,
    run_job,
    size_of,
)

NAME = "openai"
MODELS = ("gpt-image-1", "gpt-image-1.5")
SIZES = (Size(1024, 1024), Size(1536, 1024), Size(1024, 1536))
OPTIONS = {
    "quality": (None, choice("low", "medium", "high", "auto")),
    # "transparent" is left out: a fill must come back opaque to be composited.
    "background": (None, choice("opaque", "auto")),
    "input_fidelity": (None, choice("low", "high")),
    "stream": (True, boolean),
    "partial_images": (2, number(0, 3, int)),
}
DEFAULT_PROMPTS = {
    Mode.FILL: "Fill the masked area so that it continues the picture around it seamlessly.",
    Mode.ADD: "Fill the masked area so that it continues the picture around it seamlessly.",
    Mode.EXPAND: "Extend the picture into the masked area, continuing it seamlessly.",
    Mode.REMOVE: "Remove what is in the masked area and continue the background behind it seamlessly.",
}
"""The API needs a prompt; these stand in for an empty one."""
_MAX_EVENT_CHARS = 64 * 2**20

CAPABILITIES = EngineCapabilities(
    prompt=True,
    soft_masks=False,
    max_variations=10,
    native_size=1024,
    device_kind=DeviceKind.REMOTE,
    # The images API takes no seed.
    reproducible=False,
)


def settings_from(table, environ=None) -> RemoteSettings:
    return parse_settings(
        NAME, table, base_url="https://api.openai.com", key_env="OPENAI_API_KEY", models=MODELS, options=OPTIONS,
        environ=environ,
    )


def provide(context: ProviderContext) -> Iterable[EngineSpec]:
    """The ``openai`` engine, only where the server's configuration switched it on."""
    return offer(
        context,
        OpenAIEngine,
        settings_from,
        description="OpenAI image edits: the context crop is sent to {host}",
        architecture="gpt-image",
    )

def api_size(work: Size) -> Size:
    """The API size nearest ``work``'s aspect ratio."""
    ratio = math.log(work.width / work.height)
    return min(SIZES, key=lambda size: abs(math.log(size.width / size.height) - ratio))


class OpenAIEngine(RemoteEngine):
    name = NAME
    capabilities = CAPABILITIES

    def run(self, job: EngineJob, on_step: StepCallback) -> list[np.ndarray]:
        assert self.settings.key is not None
        return run_job(
            self.settings,
            self._limit,
            on_step,
            lambda call: self._edit(call, job),
            auth_headers={"Authorization": f"Bearer {self.settings.key.reveal()}"},
            classify=_classify,
        )

    def form(self, job: EngineJob, size: Size, n: int) -> tuple[dict[str, str], dict[str, tuple[str, bytes, str]]]:
        """The multipart fields and files of one request."""
        options = job.options
        image = job.image
        if options.mode in (Mode.REMOVE, Mode.EXPAND):
            # What is removed is not sent at all, and a grown canvas's new area goes as its
            # edges continued rather than black.
            image = prefill(image, job.selection, str(options.mode))
        keep = ~edit_area(job.denoise_mask)
        mask = np.zeros((*keep.shape, 4), np.uint8)
        mask[..., 3] = np.where(keep, 255, 0)
        if size != size_of(image):
            image = fill.resize(image, size)
            mask = fill.resize(mask, size)
            mask[..., 3] = np.where(mask[..., 3] >= 128, 255, 0)
        data = {
            "model": self.model,
            "prompt": options.prompt.strip() or DEFAULT_PROMPTS[options.mode],
            "n": str(n),
            "size": f"{size.width}x{size.height}",
            "output_format": "png",
        }
        for name in ("quality", "background", "input_fidelity"):
            if self.settings.options.get(name) is not None:
                data[name] = str(self.settings.options[name])
        files = {"image": ("image.png", png_bytes(image), "image/png"), "mask": ("mask.png", png_bytes(mask), "image/png")}
        return data, files

    async def _edit(self, call: Call, job: EngineJob) -> list[np.ndarray]:
        work = size_of(job.image)
        size = api_size(work)
        url = f"{self.settings.base_url}/v1/images/edits"
        count = len(job.seeds)
        if not self.settings.options["stream"]:
            call.report(0, 1)
            data, files = self.form(job, size, count)
            async with call.slot():
                response = await call.request("POST", url, data=data, files=files)
            items = _json(call, response).get("data")
            if not isinstance(items, list) or len(items) != count:
                raise call.unexpected(f"{len(items) if isinstance(items, list) else 'no'} images for {count}")
            call.report(1, 1)
            return [decode_b64(call, item.get("b64_json") if isinstance(item, dict) else None, work) for item in items]
        partials = int(self.settings.options["partial_images"])
        call.report(0, count * (partials + 1))
        data, files = self.form(job, size, 1)
        data |= {"stream": "true", "partial_images": str(partials)}

        async def one() -> np.ndarray:
            async with call.slot():
                response = await call.request("POST", url, data=data, files=files, stream=True)
                try:
                    return await self._read_stream(call, response, work)
                finally:
                    await response.aclose()

        # Each variation is its own streamed request: the API streams one image a request.
        return await all_of(one() for _ in range(count))

    async def _read_stream(self, call: Call, response: httpx.Response, work: Size) -> np.ndarray:
        async for event in _events(response):
            kind = event.get("type")
            if kind == "image_edit.partial_image":
                preview = decode_b64(call, event.get("b64_json"), work)
                call.report(call.step + 1, preview=preview_of(preview))
            elif kind == "image_edit.completed":
                image = decode_b64(call, event.get("b64_json"), work)
                call.report(call.step + 1)
                return image
            elif kind == "error" or "error" in event:
                raise _stream_error(call, event)
        raise call.unexpected("a stream that ended before its image")


async def _events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream (event ``data`` lines joined)."""
    lines: list[str] = []
    size = 0
    async for line in response.aiter_lines():
        if line == "":
            if lines:
                payload = "\n".join(lines)
                lines, size = [], 0
                if payload.strip() == "[DONE]":
                    return
                try:
                    event = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    yield event
            continue
        if line.startswith("data:"):
            value = line[5:]
            lines.append(value.removeprefix(" "))
            size += len(value)
            if size > _MAX_EVENT_CHARS:
                raise EngineError(ErrorCode.ENGINE_FAILED, "the provider's stream sent an event too large to read")
    if lines:
        with contextlib.suppress(ValueError):
            event = json.loads("\n".join(lines))
            if isinstance(event, dict):
                yield event


def _json(call: Call, response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        raise call.unexpected("an answer that is not JSON") from None
    if not isinstance(body, dict):
        raise call.unexpected("an answer that is not a JSON object")
    return body


_MODERATION_CODES = {"moderation_blocked", "content_policy_violation"}
_QUOTA_CODES = {"insufficient_quota", "billing_hard_limit_reached"}


def _codes(body: Any) -> set[str]:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return set()
    return {str(error.get(name)) for name in ("code", "type") if error.get(name)}


def _classify(call: Call, response: httpx.Response, body: Any) -> EngineError | None:
    codes = _codes(body)
    if codes & _MODERATION_CODES:
        return EngineError(
            ErrorCode.MODERATED, f"OpenAI's safety system refused this request: {call.provider_message(body)}"
        )
    if codes & _QUOTA_CODES:
        return EngineError(
            ErrorCode.REMOTE_QUOTA_EXCEEDED, f"the OpenAI account is out of credits or quota ({response.status_code})"
        )
    return None


def _stream_error(call: Call, event: dict[str, Any]) -> EngineError:
    codes = _codes(event)
    if codes & _MODERATION_CODES:
        return EngineError(ErrorCode.MODERATED, f"OpenAI's safety system refused this request: {call.provider_message(event)}")
    return EngineError(ErrorCode.ENGINE_FAILED, f"OpenAI stopped the stream: {call.provider_message(event)}")
