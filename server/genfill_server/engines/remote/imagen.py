"""Google Vertex AI Imagen edit (``imagen-3.0-capability-001``) as a genfill engine.

``POST {base_url}/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:predict``
with ``Authorization: Bearer TOKEN`` and one instance: the prompt and two
``referenceImages``, the crop (``REFERENCE_TYPE_RAW``) and the mask (``REFERENCE_TYPE_MASK``,
non-zero where it may edit, ``maskImageConfig{maskMode: MASK_MODE_USER_PROVIDED, dilation}``).
``parameters``: ``editMode`` from the request's mode (fill and add: INPAINT_INSERTION, remove:
INPAINT_REMOVAL, expand: OUTPAINT), ``sampleCount`` (the variations), ``editConfig.baseSteps``
(the request's steps), ``outputOptions.mimeType=image/png``, ``includeRaiReason``; and, only
where the configuration turns the SynthID watermark off (``add_watermark = false``), ``seed``:
Imagen takes a seed only without the watermark. The answer's ``predictions[].bytesBase64Encoded``
are the images; Imagen leaves out those its safety filter removed.

The token is the user's (``GOOGLE_ACCESS_TOKEN``, or a file), or, where google-auth is
installed and no token is configured, from Application Default Credentials.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import numpy as np
from genfill.protocol import ErrorCode, Mode

from ..base import (
    DeviceKind,
    EngineCapabilities,
    EngineError,
    EngineJob,
    StepCallback,
)
from ..spec import EngineSpec, ProviderContext
from ._common import (
    Call,
    RemoteEngine,
    RemoteSettings,
    b64_png,
    boolean,
    choice,
    decode_b64,
    edit_area,
    number,
    offer,
    parse_settings,
    run_job,
    size_of,
    text,
)

NAME = "imagen"
MODELS = ("imagen-3.0-capability-001",)
EDIT_MODES = {
    Mode.FILL: "EDIT_MODE_INPAINT_INSERTION",
    Mode.ADD: "EDIT_MODE_INPAINT_INSERTION",
    Mode.REMOVE: "EDIT_MODE_INPAINT_REMOVAL",
    Mode.EXPAND: "EDIT_MODE_OUTPAINT",
}
DILATION = {Mode.FILL: 0.01, Mode.ADD: 0.01, Mode.REMOVE: 0.03, Mode.EXPAND: 0.03}
"""Google's suggested mask dilation per edit mode, where the configuration sets none."""
OPTIONS = {
    "project": (None, text),
    "location": ("us-central1", text),
    "dilation": (None, number(0.0, 1.0)),
    "add_watermark": (True, boolean),
    "safety_setting": (None, choice("block_low_and_above", "block_medium_and_above", "block_only_high", "block_none")),
    "person_generation": (None, choice("dont_allow", "allow_adult", "allow_all")),
}
_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]

CAPABILITIES = EngineCapabilities(
    prompt=True,
    soft_masks=False,
    options=frozenset({"steps"}),
    max_variations=4,
    native_size=1024,
    device_kind=DeviceKind.REMOTE,
)


def _adc_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("google.auth") is not None
    except ModuleNotFoundError:  # no "google" package at all
        return False


def settings_from(table: Mapping[str, Any], environ=None) -> RemoteSettings:
    location = table.get("location", "us-central1")
    if not isinstance(location, str) or not location.replace("-", "").isalnum():
        raise ValueError(f"imagen.location must be a Google Cloud region such as us-central1, not {location!r}")
    settings = parse_settings(
        NAME,
        table,
        base_url=f"https://{location}-aiplatform.googleapis.com",
        key_env="GOOGLE_ACCESS_TOKEN",
        models=MODELS,
        options=OPTIONS,
        key_required=not _adc_available(),
        environ=environ,
    )
    if settings.options["project"] is None:
        raise ValueError("imagen: set project, the Google Cloud project the Vertex AI calls are billed to")
    return settings


def provide(context: ProviderContext) -> Iterable[EngineSpec]:
    """The ``imagen`` engine, only where the server's configuration switched it on."""
    return offer(
        context,
        ImagenEngine,
        settings_from,
        description="Google Imagen edit on Vertex AI: the context crop is sent to {host}",
        architecture="imagen",
    )

class ImagenEngine(RemoteEngine):
    name = NAME
    capabilities = CAPABILITIES

    def __init__(self, settings: RemoteSettings, limit: threading.Semaphore, model: str | None = None) -> None:
        super().__init__(settings, limit, model)
        self._credentials = None
        self._credentials_lock = threading.Lock()

    @classmethod
    def capabilities_for(cls, settings: RemoteSettings) -> EngineCapabilities:
        # Imagen takes a seed only with its watermark off (see the module docstring).
        return super().capabilities_for(settings).refined(reproducible=not settings.options["add_watermark"])

    def run(self, job: EngineJob, on_step: StepCallback) -> list[np.ndarray]:
        return run_job(self.settings, self._limit, on_step, lambda call: self._edit(call, job),
                       auth_headers=self._auth_headers, classify=_classify)

    @property
    def url(self) -> str:
        options = self.settings.options
        return (
            f"{self.settings.base_url}/v1/projects/{options['project']}/locations/{options['location']}"
            f"/publishers/google/models/{self.model}:predict"
        )

    def body(self, job: EngineJob, count: int) -> dict[str, Any]:
        options = job.options
        configured = self.settings.options
        mask = np.where(edit_area(job.denoise_mask), 255, 0).astype(np.uint8)
        dilation = configured["dilation"] if configured["dilation"] is not None else DILATION[options.mode]
        instance = {
            "prompt": options.prompt.strip(),
            "referenceImages": [
                {"referenceType": "REFERENCE_TYPE_RAW", "referenceId": 1,
                 "referenceImage": {"bytesBase64Encoded": b64_png(job.image)}},
                {"referenceType": "REFERENCE_TYPE_MASK", "referenceId": 2,
                 "referenceImage": {"bytesBase64Encoded": b64_png(mask)},
                 "maskImageConfig": {"maskMode": "MASK_MODE_USER_PROVIDED", "dilation": dilation}},
            ],
        }
        parameters: dict[str, Any] = {
            "editMode": EDIT_MODES[options.mode],
            "sampleCount": count,
            "outputOptions": {"mimeType": "image/png"},
            "includeRaiReason": True,
        }
        if options.steps is not None:
            parameters["editConfig"] = {"baseSteps": options.steps}
        if not configured["add_watermark"]:
            parameters["addWatermark"] = False
            parameters["seed"] = int(job.seeds[0])
        if configured["safety_setting"] is not None:
            parameters["safetySetting"] = configured["safety_setting"]
        if configured["person_generation"] is not None:
            parameters["personGeneration"] = configured["person_generation"]
        return {"instances": [instance], "parameters": parameters}

    async def _edit(self, call: Call, job: EngineJob) -> list[np.ndarray]:
        wanted = len(job.seeds)
        work = size_of(job.image)
        images: list[np.ndarray] = []
        reasons: list[str] = []
        call.report(0, wanted)
        # Imagen answers fewer images than asked when its safety filter removed some: the
        # missing ones are asked for once more, then the job fails as moderated.
        for _ in range(2):
            async with call.slot():
                response = await call.request("POST", self.url, json=self.body(job, wanted - len(images)))
            try:
                predictions = response.json().get("predictions", [])
            except (ValueError, AttributeError):
                raise call.unexpected("an answer that is not a JSON object") from None
            if not isinstance(predictions, list):
                raise call.unexpected("predictions that are not a list")
            for prediction in predictions:
                if isinstance(prediction, dict) and prediction.get("bytesBase64Encoded"):
                    images.append(decode_b64(call, prediction["bytesBase64Encoded"], work))
                elif isinstance(prediction, dict) and prediction.get("raiFilteredReason"):
                    reasons.append(call.redact(str(prediction["raiFilteredReason"])))
            call.report(min(len(images), wanted))
            if len(images) >= wanted:
                return images[:wanted]
        why = f": {reasons[0]}" if reasons else ""
        raise EngineError(
            ErrorCode.MODERATED,
            f"Imagen's safety filter removed {wanted - len(images)} of {wanted} images{why}",
        )

    def _auth_headers(self) -> dict[str, str]:
        if self.settings.key is not None:
            return {"Authorization": f"Bearer {self.settings.key.reveal()}"}
        return {"Authorization": f"Bearer {self._adc_token()}"}

    def _adc_token(self) -> str:
        """A token from Application Default Credentials (google-auth), refreshed when stale."""
        try:
            import google.auth
            import google.auth.transport.requests
        except ImportError as exc:
            raise EngineError(
                ErrorCode.REMOTE_AUTH_FAILED, "no Google token: set GOOGLE_ACCESS_TOKEN or install google-auth"
            ) from exc
        with self._credentials_lock:
            try:
                if self._credentials is None:
                    self._credentials, _ = google.auth.default(scopes=_SCOPES)
                if not self._credentials.valid:
                    self._credentials.refresh(google.auth.transport.requests.Request())
            except Exception as exc:
                raise EngineError(
                    ErrorCode.REMOTE_AUTH_FAILED,
                    "no usable Google credentials: run `gcloud auth application-default login` or set GOOGLE_ACCESS_TOKEN",
                ) from exc
            return self._credentials.token


_MODERATION_WORDS = ("responsible ai", "sensitive words", "safety", "violate")


def _classify(call: Call, response: httpx.Response, body: Any) -> EngineError | None:
    if response.status_code != 400:
        return None
    message = call.provider_message(body, response)
    if any(word in message.lower() for word in _MODERATION_WORDS):
        return EngineError(ErrorCode.MODERATED, f"Imagen's safety filter refused this request: {message}")
    return None
