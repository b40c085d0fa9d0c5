"""The FastAPI application: ``create_app(settings) -> FastAPI``.

Start-up (the lifespan) resolves the device, verifies every file of the bundle against its
manifest and loads it; any failure there stops start-up with a message naming the file.  The
warm-up inference then runs in the background: ``/health/ready`` answers 503 until it has passed.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, File, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from detector import BundleError
from detector.devices import DeviceError, resolve_device

from .access import (
    AccessError,
    AccessMiddleware,
    ApiKeys,
    RateLimiter,
    read_api_keys,
    route_path,
)
from .audit import AuditTrail, RequestIdMiddleware, request_id
from .batching import InferenceFailed, MicroBatcher, Overloaded
from .engine import Engine, ImageResult
from .images import (
    ALLOWED_FORMATS,
    ImageRejected,
    UploadInfo,
    decode_upload,
)
from .limits import BodyLimitMiddleware
from .metrics import CONTENT_TYPE_LATEST, Metrics, MetricsMiddleware
from .schemas import (
    BatchUpload,
    ErrorResponse,
    InputSpecModel,
    Liveness,
    ModelMetadata,
    ModelRef,
    Prediction,
    Readiness,
    ServiceLimits,
    SingleUpload,
    UploadInfoModel,
    Verdict,
)
from .settings import Settings

__all__ = ["ApiError", "Service", "StartupError", "create_app", "get_ready_service", "get_service", "get_settings"]

log = logging.getLogger("service")

PREDICT = "/predict"
PREDICT_BATCH = "/predict/batch"


class StartupError(RuntimeError):
    """The service cannot start (broken bundle, missing device); the message says why."""


class ApiError(Exception):
    """An error answer: HTTP ``status``, a stable ``code`` and a ``detail`` for humans."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers


class Service:
    """Everything a request needs: settings, metrics, and once loaded the engine and the batcher."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.batcher: MicroBatcher | None = None
        self.status = "loading"
        self.detail: str | None = "the bundle is not loaded yet"
        self.decode_limiter = anyio.CapacityLimiter(settings.decode_threads)
        self._warmup: asyncio.Task | None = None
        self.keys = ApiKeys(read_api_keys(settings.api_keys, settings.api_keys_file))
        self.limiter = RateLimiter(settings.rate_limit_per_s, settings.effective_rate_limit_burst)
        self.audit = AuditTrail(settings.audit_log, settings.quarantine_dir, settings.quarantine_max_bytes)
        self._failed_batches = 0  # micro-batches in a row in which the model failed on every image
        self._last_probe = float("-inf")

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Verify and load the bundle (raising :class:`StartupError`), start batching, begin warm-up."""
        s = self.settings
        path = Path(s.bundle_dir)
        try:
            device = resolve_device(s.device)
        except DeviceError as exc:
            raise StartupError(str(exc)) from exc
        try:
            self.audit.open()
        except OSError as exc:
            raise StartupError(f"cannot open the audit log or the quarantine: {exc}") from exc
        try:
            # load_bundle checks every file against the manifest before deserialising anything.
            self.engine = await anyio.to_thread.run_sync(Engine.load, path, device, s.bundle_sha256,
                                                          s.trusted_architecture_list)
        except BundleError as exc:
            raise StartupError(f"cannot serve bundle {str(path)!r}: {exc}") from exc
        except Exception as exc:  # e.g. out of device memory
            raise StartupError(f"cannot load bundle {str(path)!r} onto {device}: {type(exc).__name__}: {exc}") from exc
        log.info("bundle %s verified (sha256 %s) and loaded: %s, %d classes, input %d×%d×%d, on %s", path,
                 self.engine.sha256, self.engine.name, len(self.engine.bundle.classes), self.engine.channels,
                 *self.engine.size, device)
        self.batcher = MicroBatcher(
            self.engine.infer, max_batch_size=s.max_batch_size, max_wait_s=s.max_wait_ms / 1000.0,
            max_queue=s.max_queue, on_batch=self._batch_passed, on_failure=self._batch_failed,
        )
        self.batcher.start()
        if s.torch_threads:
            import torch

            torch.set_num_threads(s.torch_threads)
            await self.batcher.run_in_worker(torch.set_num_threads, s.torch_threads)  # OpenMP: per thread
        self.status, self.detail = "loading", "warming up"
        if s.workers > 1:
            # Workers share one listening socket: a worker must not take connections before it can answer
            # them, or a request that lands on it while another worker serves would get 503.
            await self._warm_up()
        else:
            self._warmup = asyncio.create_task(self._warm_up(), name="warm-up")

    async def _warm_up(self) -> None:
        engine, s = self.engine, self.settings
        sizes = tuple(sorted({1, min(s.max_batch_size, 256)}))
        try:
            # In the batcher's inference thread, like every later forward pass.
            await self.batcher.run_in_worker(engine.warm_up, sizes, s.warmup_iterations)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.status, self.detail = "failed", f"warm-up inference failed: {type(exc).__name__}: {exc}"
            log.error("%s; the service stays unready", self.detail, exc_info=exc)
            return
        self.status, self.detail = "ready", None
        self.metrics.ready.set(1)
        log.info("ready: warm-up inference passed at batch sizes %s", list(sizes))

    # -- health of the model ---------------------------------------------------------------------
    def _batch_passed(self, size: int, seconds: float) -> None:
        self.metrics.observe_batch(size, seconds)
        self._failed_batches = 0

    def _batch_failed(self, all_failed: bool) -> None:
        """After a batch raised and its images were retried one by one."""
        self._failed_batches = self._failed_batches + 1 if all_failed else 0
        limit = self.settings.unready_after_failures
        if self._failed_batches >= limit and self.status == "ready":
            self.status = "failed"
            self.detail = (f"the model failed on every image of {self._failed_batches} micro-batches in a row; "
                           f"readiness returns once a probe inference passes")
            self.metrics.ready.set(0)
            log.error("%s", self.detail)

    async def probe(self) -> None:
        """When inference failures made the service unready: one warm-up inference, at most once a
        second; ready again if it passes."""
        if self.status != "failed" or self._failed_batches == 0 or self.batcher is None:
            return
        now = asyncio.get_running_loop().time()
        if now - self._last_probe < 1.0:
            return
        self._last_probe = now
        try:
            await self.batcher.run_in_worker(self.engine.warm_up, (1,), 1)
        except Exception as exc:
            log.error("probe inference failed: %s: %s", type(exc).__name__, exc)
            return
        self._failed_batches = 0
        self.status, self.detail = "ready", None
        self.metrics.ready.set(1)
        log.info("probe inference passed: ready again")

    async def stop(self) -> None:
        task = self._warmup
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self.batcher is not None:
            await self.batcher.stop()
        await anyio.to_thread.run_sync(self.audit.close)  # queued quarantine writes finish first
        self.metrics.ready.set(0)

    # -- requests --------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def model_ref(self) -> ModelRef:
        return ModelRef(name=self.engine.name, sha256=self.engine.sha256)

    async def decode(self, upload, where: str):
        data = await upload.read()
        decode = partial(decode_upload, data, upload.content_type, channels=self.engine.channels,
                         size=self.engine.size, max_pixels=self.settings.max_pixels)
        try:  # never on the event loop: a file of a few bytes can cost the decoder tens of milliseconds
            return (*await anyio.to_thread.run_sync(decode, limiter=self.decode_limiter), data)
        except ImageRejected as exc:
            self.metrics.rejected.labels(exc.code).inc()
            raise ApiError(exc.status, exc.code, f"{where}: {exc.message}") from exc

    async def classify(self, decoded: list[tuple[Any, UploadInfo, bytes]], request: Request,
                       client: str) -> list[Prediction]:
        """Answers for decoded uploads ``(array, info, bytes)``; flagged ones go to the audit trail."""
        try:
            results: list[ImageResult] = await self.batcher.submit_many([array for array, _, _ in decoded])
        except Overloaded as exc:
            self.metrics.rejected.labels("overloaded").inc()
            raise ApiError(503, "overloaded", f"the service is overloaded: {exc}; retry shortly",
                           headers={"Retry-After": "1"}) from exc
        except InferenceFailed as exc:
            self.metrics.inference_failures.inc()
            raise ApiError(500, "inference_failed",
                           "the model failed on this image (the other images of its micro-batch were answered); "
                           "the server log has the error") from exc
        self.metrics.observe_results(results)
        ref = self.model_ref()
        tau = self.engine.valley_threshold
        # vars(), not dataclasses.asdict: the fields are already plain values, no deep copy needed.
        size = self.engine.size
        answers = [Prediction(**vars(r), valley_threshold=tau, input=_upload_info(info, size), model=ref)
                   for r, (_, info, _) in zip(results, decoded, strict=True)]
        flagged = [(i, data, info.format, a) for i, (a, (_, info, data)) in enumerate(zip(answers, decoded))
                   if a.adversarial]
        if flagged:
            unwritten = self.audit.record(request_id=request_id(request.scope), client=client,
                                          route=route_path(request.scope), bundle_sha256=ref.sha256, flagged=flagged)
            if unwritten:
                self.metrics.audit_write_failures.inc(unwritten)
        return answers


def _upload_info(info: UploadInfo, size: tuple[int, int]) -> UploadInfoModel:
    notes = []
    if info.resized:
        notes.append(f"resized from {info.width}×{info.height} to {size[1]}×{size[0]}")
    if info.converted:
        notes.append(f"converted from mode {info.mode}")
    return UploadInfoModel(format=info.format, width=info.width, height=info.height, mode=info.mode,
                           resized=info.resized, converted=info.converted, note="; ".join(notes))


# -- dependencies --------------------------------------------------------------------------------
# ``async def`` although they do not await: FastAPI runs a plain ``def`` dependency in its threadpool,
# a thread hop per request for a dictionary lookup.
async def get_service(request: Request) -> Service:
    return request.app.state.service


async def get_settings(request: Request) -> Settings:
    return request.app.state.service.settings


async def get_ready_service(service: Annotated[Service, Depends(get_service)]) -> Service:
    if not service.ready:
        raise ApiError(503, "not_ready", f"the model is not ready: {service.detail}", headers={"Retry-After": "1"})
    return service


_bearer = HTTPBearer(auto_error=False, description="An API key, when the service is configured with some.")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key (instead of Authorization).")


async def get_client(request: Request,
                     bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
                     api_key: Annotated[str | None, Security(_api_key)]) -> str:
    """The client's name: its API key's id, or its address (set by :class:`AccessMiddleware`, which
    has already refused requests without an accepted key). The parameters document the schemes."""
    return request.scope.get("state", {}).get("client", "ip:unknown")


def spend(service: Service, client: str, images: int) -> None:
    """Take ``images`` from the client's rate limit, or answer 429."""
    try:
        service.limiter.take(client, images)
    except AccessError as exc:
        service.metrics.rejected.labels(exc.code).inc()
        raise ApiError(exc.status, exc.code, exc.detail, exc.headers) from exc


ServiceDep = Annotated[Service, Depends(get_service)]
ClientDep = Annotated[str, Depends(get_client)]
ReadyServiceDep = Annotated[Service, Depends(get_ready_service)]


def _image_encoding(field: str) -> dict[str, Any]:
    """OpenAPI: the multipart part ``field`` holds an image of the formats the service takes."""
    types = ", ".join(types[0] for types in ALLOWED_FORMATS.values())
    return {"requestBody": {"content": {"multipart/form-data": {"encoding": {field: {"contentType": types}}}}}}


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Corrupt or truncated image, zero dimensions, bad multipart, too many files."},
    401: {"model": ErrorResponse, "description": "API keys are configured and the request has no accepted one."},
    413: {"model": ErrorResponse, "description": "Body over the byte cap, or image over the pixel cap."},
    415: {"model": ErrorResponse, "description": "Not an image, unsupported format, or a content type that does not match the data."},
    422: {"model": ErrorResponse, "description": "Missing or malformed form field."},
    429: {"model": ErrorResponse, "description": "Over the client's rate limit (`Retry-After` says when to retry)."},
    500: {"model": ErrorResponse, "description": "The model raised on this image, run on its own (`inference_failed`)."},
    503: {"model": ErrorResponse, "description": "Not ready yet (warming up) or overloaded; retry."},
}


def _without_threshold(section_of: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    """``section_of`` with ``section_of[key]["threshold"]`` left out (verdict-only answers keep it)."""
    if not isinstance(section_of, dict) or not isinstance(section_of.get(key), dict):
        return section_of
    return {**section_of, key: {k: v for k, v in section_of[key].items() if k != "threshold"}}


def _where(upload, index: int | None) -> str:
    name = f" {upload.filename!r}" if upload.filename else ""
    return f"file{name}" if index is None else f"files[{index}]{name}"


# -- error handlers ------------------------------------------------------------------------------
def _error(status: int, code: str, detail: str, headers=None, errors=None) -> JSONResponse:
    body = ErrorResponse(code=code, detail=detail, errors=errors).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


_STATUS_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                 415: "unsupported_media_type", 422: "invalid_request", 503: "unavailable"}


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail, path = str(exc.detail), route_path(request.scope)
        code = _STATUS_CODES.get(exc.status_code, "error")
        if detail.startswith("Too many files"):
            code = "too_many_files"
            limit = settings.max_batch_files if path == PREDICT_BATCH else 1
            detail = (f"too many files in one request: at most {limit} "
                      + ("(DETECTOR_MAX_BATCH_FILES)" if limit != 1 or path == PREDICT_BATCH
                         else "per /predict request; use /predict/batch for several"))
        elif exc.status_code == 405:
            allowed = (getattr(exc, "headers", None) or {}).get("Allow", "")
            detail = f"method {request.method} is not allowed on {path}" + (
                f"; use {allowed}" if allowed else "")
        elif exc.status_code == 400 and path in (PREDICT, PREDICT_BATCH):
            code = "bad_multipart"
            detail = f"the multipart/form-data body cannot be parsed: {detail}"
        return _error(exc.status_code, code, detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        ctype = request.headers.get("content-type", "")
        path = route_path(request.scope)
        field = "files" if path == PREDICT_BATCH else "file"
        if path in (PREDICT, PREDICT_BATCH) and not ctype.lower().startswith("multipart/form-data"):
            shown = ctype or "none"
            return _error(415, "unsupported_media_type",
                          f"expected a multipart/form-data body with the image(s) in field {field!r} "
                          f"(content type was {shown})")
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        parts = []
        for e in errors:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            msg = e.get("msg", "invalid")
            if e.get("type") == "missing":
                msg = "is required (a file upload)" if loc in ("file", "files") else "is required"
            elif "UploadFile" in msg:
                msg = "must be a file upload, not a text field"
            parts.append(f"field {loc!r} {msg}" if loc else msg)
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request", errors=errors)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # Answered outside every middleware (Starlette's outermost error handler), so the request id
        # that ties the answer to this log line is added here.
        rid = request.scope.get("state", {}).get("request_id", "-")
        log.exception("unhandled error on %s %s (request %s)", request.method, route_path(request.scope), rid)
        return _error(500, "internal_error", f"internal error: {type(exc).__name__}", {"X-Request-ID": rid})


# -- the app -------------------------------------------------------------------------------------
def _configure_logging(level: str) -> None:
    logger = logging.getLogger("service")
    logger.setLevel(logging.DEBUG if level == "trace" else level.upper())
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for ``settings`` (default: from the ``DETECTOR_*`` environment).

    Works as a uvicorn factory: ``uvicorn --factory service.app:create_app``.
    """
    settings = settings if settings is not None else Settings()
    _configure_logging(settings.log_level)
    # PIL's own decompression-bomb guard, as a second line behind the explicit pixel cap.
    Image.MAX_IMAGE_PIXELS = settings.max_pixels
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await service.start()
        except StartupError as exc:
            log.error("start-up failed: %s", exc)
            raise
        try:
            yield
        finally:
            await service.stop()

    app = FastAPIOffline(
        title="Uncanny-valley adversarial-example detector",
        version="0.1.0",
        description=(
            "Classifies images and flags adversarial inputs from the loss curvature of the last layer "
            "(ψ_j = ŷ_j(1 − ŷ_j)‖φ‖², κ = ‖W‖_F Σ ψ_j), all from the prediction's own forward pass. "
            "Errors are JSON `{code, detail}`."
        ),
        lifespan=lifespan,
    )
    app.state.service = service
    _install_error_handlers(app, settings)

    def limit_for(path: str) -> int:
        return settings.max_batch_upload_bytes if path == PREDICT_BATCH else settings.max_upload_bytes

    def setting_for(path: str) -> str:
        return "DETECTOR_MAX_BATCH_UPLOAD_BYTES" if path == PREDICT_BATCH else "DETECTOR_MAX_UPLOAD_BYTES"

    # Added last = runs first: ids and metrics see every request; keys, and empty rate-limit buckets, are
    # checked before the body is read.
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for, setting_for=setting_for,
                       in_flight_cap=settings.max_inflight_body_bytes,
                       in_flight_setting="DETECTOR_MAX_INFLIGHT_BODY_BYTES",
                       per_client_cap=settings.max_inflight_body_bytes_per_client)
    app.add_middleware(AccessMiddleware, keys=service.keys, protected=frozenset({PREDICT, PREDICT_BATCH, "/model",
                                                                                 "/metrics"}),
                       limiter=service.limiter, limited=frozenset({PREDICT, PREDICT_BATCH}),
                       refused=lambda code: service.metrics.rejected.labels(code).inc())
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    app.add_middleware(RequestIdMiddleware)
    Answer = Verdict if settings.verdict_only else Prediction

    def answer(predictions: list[Prediction]) -> list:
        if not settings.verdict_only:
            return predictions
        return [Verdict(label=p.label, class_name=p.class_name, adversarial=p.adversarial,
                        uncanny_valley=p.uncanny_valley, input=p.input, model=p.model) for p in predictions]

    @app.post(PREDICT, response_model=Answer, responses=_ERRORS, tags=["predict"],
              form_limits={"max_files": 1, "max_fields": 16}, summary="Classify one image and check it",
              openapi_extra=_image_encoding("file"))
    async def predict(upload: Annotated[SingleUpload, File()], svc: ReadyServiceDep, client: ClientDep,
                      request: Request):
        """One image (field `file`) → prediction, ψ, κ and the detector's verdict."""
        spend(svc, client, 1)
        decoded = await svc.decode(upload.file, _where(upload.file, None))
        return answer(await svc.classify([decoded], request, client))[0]

    @app.post(PREDICT_BATCH, response_model=list[Answer], responses=_ERRORS, tags=["predict"],
              form_limits={"max_files": settings.max_batch_files, "max_fields": 16},
              summary="Classify several images and check them", openapi_extra=_image_encoding("files"))
    async def predict_batch(upload: Annotated[BatchUpload, File()], svc: ReadyServiceDep, client: ClientDep,
                            request: Request):
        """Several images (field `files`, repeated) → one answer each, in order."""
        files = upload.files
        if len(files) > settings.max_batch_files:
            raise ApiError(400, "too_many_files", f"{len(files)} files in one request; at most "
                                                  f"{settings.max_batch_files} (DETECTOR_MAX_BATCH_FILES)")
        spend(svc, client, len(files))
        # At most half the decode threads per request: one client's batch of large images cannot hold
        # them all, and the limiter's queue is first come, first served.
        share = anyio.CapacityLimiter(max(1, settings.decode_threads // 2))

        async def decode(i: int, f) -> tuple:
            async with share:
                return await svc.decode(f, _where(f, i))

        decoded = await asyncio.gather(*(decode(i, f) for i, f in enumerate(files)))
        return answer(await svc.classify(list(decoded), request, client))

    @app.get("/health/live", response_model=Liveness, tags=["health"], summary="The process is up")
    async def live() -> Liveness:
        return Liveness()

    @app.get("/health/ready", response_model=Readiness, tags=["health"],
             responses={503: {"model": Readiness, "description": "Loading, warming up, or failed."}},
             summary="The model is loaded and a warm-up inference has passed")
    async def ready(svc: ServiceDep, response: Response) -> Readiness:
        await svc.probe()
        model = svc.model_ref() if svc.engine is not None else None
        if not svc.ready:
            response.status_code = 503
        return Readiness(status=svc.status, detail=svc.detail, model=model)

    @app.get("/model", response_model=ModelMetadata, tags=["model"],
             responses={503: {"model": ErrorResponse}}, summary="The bundle's metadata and metrics")
    async def model(svc: ServiceDep, client: ClientDep) -> ModelMetadata:
        engine = svc.engine
        if engine is None:
            raise ApiError(503, "not_ready", "the bundle is not loaded yet")
        bundle = engine.bundle
        report = bundle.report or {}
        metrics = None
        if report:
            # Verdict-only answers keep τ to themselves: the "valley" section carries it.
            keys = ("detection", "attack") if svc.settings.verdict_only else ("detection", "valley", "attack")
            metrics = {key: report[key] for key in keys if key in report}
            classifier = report.get("classifier")
            if isinstance(classifier, dict) and "clean_accuracy" in classifier:
                metrics["clean_accuracy"] = classifier["clean_accuracy"]
        s = svc.settings
        coverage = report.get("evaluation") if isinstance(report.get("evaluation"), dict) else None
        if s.verdict_only:  # the flagging threshold is one too, wherever the report records it
            metrics = _without_threshold(metrics, "detection")
            coverage = _without_threshold(coverage, "detector")
        return ModelMetadata(
            coverage=coverage, name=engine.name, sha256=engine.sha256, architecture=bundle.architecture, layer=bundle.layer,
            classes=bundle.classes, input_spec=InputSpecModel(**bundle.input_spec.to_dict()),
            thresholds={} if s.verdict_only else bundle.thresholds, detection_metrics=metrics,
            device=str(engine.device),
            limits=ServiceLimits(
                max_upload_bytes=s.max_upload_bytes, max_batch_upload_bytes=s.max_batch_upload_bytes,
                max_pixels=s.max_pixels, max_batch_files=s.max_batch_files, max_batch_size=s.max_batch_size,
                max_wait_ms=s.max_wait_ms, formats=[f.lower() for f in ALLOWED_FORMATS],
            ),
        )

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics",
             response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format."}})
    async def metrics(svc: ServiceDep, client: ClientDep) -> Response:
        if svc.batcher is not None:
            svc.metrics.queue.set(svc.batcher.queued)
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # HTTP asks every resource that answers GET to answer HEAD too (uptime checks and load balancers
    # use it); FastAPI's GET routes do not, and uvicorn sends a HEAD answer's headers without its body.
    for route in [r for r in app.routes if isinstance(r, APIRoute) and r.methods == {"GET"}]:
        app.add_api_route(route.path, route.endpoint, methods=["HEAD"], include_in_schema=False,
                          response_model=route.response_model, response_class=route.response_class,
                          name=f"{route.name}_head")
    return app
