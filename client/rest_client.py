"""RestClient: management of training runs, checkpoints, samplers and sessions.

Role: thin wrappers over the REST routes (no session, no polling). As in
tinker, each sync method returns an :class:`APIFuture` and each ``_async``
twin returns the value.

Routes: ``GET /api/v1/training_runs[/{id}]``, ``GET
/api/v1/training_runs/{id}/checkpoints``, ``GET /api/v1/checkpoints``,
``DELETE /api/v1/training_runs/{id}/checkpoints/{kind}/{name}``,
``PUT …/ttl``, ``POST``/``DELETE …/publish``,
``POST /api/v1/weights_info``, ``GET /api/v1/samplers/{id}``,
``GET /api/v1/sessions[/{id}]``, ``POST /api/v1/sessions/search``, ``PUT
/api/v1/sessions/{id}/project``, ``GET /api/v1/sessions/{id}/trace_export``,
``GET /api/v1/auth/apikey/me``, ``POST /api/v1/copy_weights``,
``GET /api/v1/billing/usage/events``, ``GET /api/v1/billing/usage/checkpoints/current``,
``GET …/checkpoints/external_weights/{name}/external_weights_urls``, ``GET /api/v1/audit``. Checkpoint ids keep
their kind segment (``weights/<name>``), put into URLs unescaped as tinker does. ``download_checkpoint`` fetches those signed
URLs without the API key (they may point at an S3 bucket).
"""

from __future__ import annotations

import os
from collections.abc import Coroutine
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from . import errors, types
from .futures import APIFuture
from .http import HttpClient
from .types.limits import MAX_PAGE_SIZE

T = TypeVar("T")
AccessScope = Literal["owned", "accessible"]


class RestClient:
    """Run/checkpoint management; get one from ``ServiceClient.create_rest_client()``."""

    def __init__(self, http: HttpClient) -> None:
        self._http = http

    def _future(self, coro: Coroutine[Any, Any, T], name: str) -> APIFuture[T]:
        return APIFuture(self._http.run(coro), name)

    # ------------------------------------------------------------ coroutines
    async def _get_run(self, run_id: str, access_scope: AccessScope) -> types.TrainingRun:
        body = await self._http.get_json(f"/api/v1/training_runs/{run_id}", {"access_scope": access_scope})
        return types.TrainingRun.model_validate(body)

    async def _list_runs(
        self, limit: int, offset: int, access_scope: AccessScope, project_id: str | None
    ) -> types.TrainingRunsResponse:
        params = {"limit": limit, "offset": offset, "access_scope": access_scope, "project_id": project_id}
        body = await self._http.get_json("/api/v1/training_runs", params)
        return types.TrainingRunsResponse.model_validate(body)

    async def _list_checkpoints(self, run_id: str) -> types.CheckpointsListResponse:
        body = await self._http.get_json(f"/api/v1/training_runs/{run_id}/checkpoints")
        return types.CheckpointsListResponse.model_validate(body)

    async def _list_user_checkpoints(self, limit: int, offset: int) -> types.CheckpointsListResponse:
        body = await self._http.get_json("/api/v1/checkpoints", {"limit": limit, "offset": offset})
        return types.CheckpointsListResponse.model_validate(body)

    async def _delete_checkpoint(self, run_id: str, checkpoint_id: str) -> None:
        await self._http.request("DELETE", f"/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}")

    async def _weights_info(self, tinker_path: str) -> types.WeightsInfoResponse:
        body = await self._http.post_json(
            "/api/v1/weights_info", types.WeightsInfoRequest(tinker_path=tinker_path).to_wire()
        )
        return types.WeightsInfoResponse.model_validate(body)

    async def _set_ttl(self, run_id: str, checkpoint_id: str, ttl_seconds: int | None) -> None:
        await self._http.request(
            "PUT", f"/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/ttl", json={"ttl_seconds": ttl_seconds}
        )

    async def _publish(self, run_id: str, checkpoint_id: str, publish: bool) -> None:
        await self._http.request(
            "POST" if publish else "DELETE", f"/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/publish"
        )

    async def _get_sampler(self, sampler_id: str) -> types.GetSamplerResponse:
        return types.GetSamplerResponse.model_validate(await self._http.get_json(f"/api/v1/samplers/{sampler_id}"))

    async def _get_session(self, session_id: str) -> types.GetSessionResponse:
        return types.GetSessionResponse.model_validate(await self._http.get_json(f"/api/v1/sessions/{session_id}"))

    async def _list_sessions(self, limit: int, offset: int) -> types.ListSessionsResponse:
        body = await self._http.get_json("/api/v1/sessions", {"limit": limit, "offset": offset})
        return types.ListSessionsResponse.model_validate(body)

    # ----------------------------------------------------------- public API
    def get_training_run(
        self, training_run_id: str, access_scope: AccessScope = "owned"
    ) -> APIFuture[types.TrainingRun]:
        return self._future(self._get_run(training_run_id, access_scope), "GetTrainingRun")

    async def get_training_run_async(
        self, training_run_id: str, access_scope: AccessScope = "owned"
    ) -> types.TrainingRun:
        return await self._http.call_async(self._get_run(training_run_id, access_scope))

    def get_training_run_by_tinker_path(self, tinker_path: str) -> APIFuture[types.TrainingRun]:
        run_id = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path).training_run_id
        return self.get_training_run(run_id)

    async def get_training_run_by_tinker_path_async(self, tinker_path: str) -> types.TrainingRun:
        run_id = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path).training_run_id
        return await self.get_training_run_async(run_id)

    def list_training_runs(
        self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned", project_id: str | None = None
    ) -> APIFuture[types.TrainingRunsResponse]:
        return self._future(self._list_runs(limit, offset, access_scope, project_id), "ListTrainingRuns")

    async def list_training_runs_async(
        self, limit: int = 20, offset: int = 0, access_scope: AccessScope = "owned", project_id: str | None = None
    ) -> types.TrainingRunsResponse:
        return await self._http.call_async(self._list_runs(limit, offset, access_scope, project_id))

    def list_checkpoints(self, training_run_id: str) -> APIFuture[types.CheckpointsListResponse]:
        return self._future(self._list_checkpoints(training_run_id), "ListCheckpoints")

    async def list_checkpoints_async(self, training_run_id: str) -> types.CheckpointsListResponse:
        return await self._http.call_async(self._list_checkpoints(training_run_id))

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> APIFuture[types.CheckpointsListResponse]:
        return self._future(self._list_user_checkpoints(limit, offset), "ListUserCheckpoints")

    async def list_user_checkpoints_async(self, limit: int = 100, offset: int = 0) -> types.CheckpointsListResponse:
        return await self._http.call_async(self._list_user_checkpoints(limit, offset))

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        """Delete ``checkpoint_id`` (``weights/<name>`` or ``sampler_weights/<name>``)."""
        return self._future(self._delete_checkpoint(training_run_id, checkpoint_id), "DeleteCheckpoint")

    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        await self._http.call_async(self._delete_checkpoint(training_run_id, checkpoint_id))

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        return self.delete_checkpoint(parsed.training_run_id, parsed.checkpoint_id)

    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        await self.delete_checkpoint_async(parsed.training_run_id, parsed.checkpoint_id)

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[types.WeightsInfoResponse]:
        return self._future(self._weights_info(tinker_path), "WeightsInfo")

    async def get_weights_info_by_tinker_path_async(self, tinker_path: str) -> types.WeightsInfoResponse:
        return await self._http.call_async(self._weights_info(tinker_path))

    def set_checkpoint_ttl_from_tinker_path(self, tinker_path: str, ttl_seconds: int | None) -> APIFuture[None]:
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        return self._future(
            self._set_ttl(parsed.training_run_id, parsed.checkpoint_id, ttl_seconds), "SetCheckpointTtl"
        )

    async def set_checkpoint_ttl_from_tinker_path_async(self, tinker_path: str, ttl_seconds: int | None) -> None:
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        await self._http.call_async(self._set_ttl(parsed.training_run_id, parsed.checkpoint_id, ttl_seconds))

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        return self._future(self._publish(parsed.training_run_id, parsed.checkpoint_id, True), "PublishCheckpoint")

    async def publish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        await self._http.call_async(self._publish(parsed.training_run_id, parsed.checkpoint_id, True))

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        return self._future(self._publish(parsed.training_run_id, parsed.checkpoint_id, False), "UnpublishCheckpoint")

    async def unpublish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        await self._http.call_async(self._publish(parsed.training_run_id, parsed.checkpoint_id, False))

    def get_sampler(self, sampler_id: str) -> APIFuture[types.GetSamplerResponse]:
        return self._future(self._get_sampler(sampler_id), "GetSampler")

    async def get_sampler_async(self, sampler_id: str) -> types.GetSamplerResponse:
        return await self._http.call_async(self._get_sampler(sampler_id))

    def get_session(self, session_id: str) -> APIFuture[types.GetSessionResponse]:
        return self._future(self._get_session(session_id), "GetSession")

    async def get_session_async(self, session_id: str) -> types.GetSessionResponse:
        return await self._http.call_async(self._get_session(session_id))

    def list_sessions(self, limit: int = 20, offset: int = 0) -> APIFuture[types.ListSessionsResponse]:
        return self._future(self._list_sessions(limit, offset), "ListSessions")

    async def list_sessions_async(self, limit: int = 20, offset: int = 0) -> types.ListSessionsResponse:
        return await self._http.call_async(self._list_sessions(limit, offset))

    @staticmethod
    def _external_weights_urls_path(tinker_path: str) -> str:
        """The URL route of an external weights checkpoint's download URLs (``ValueError`` for other paths)."""
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        if parsed.checkpoint_type != "external":
            raise ValueError(
                "only external weights checkpoints (tinker://<run>/external_weights/<name>) have download URLs; "
                f"export {tinker_path} with TrainingClient.save_weights_external first"
            )
        return (
            f"/api/v1/training_runs/{parsed.training_run_id}/checkpoints/{parsed.checkpoint_id}/external_weights_urls"
        )

    async def _external_weights_urls(self, route: str) -> types.ExternalWeightsUrlsResponse:
        return types.ExternalWeightsUrlsResponse.model_validate(await self._http.get_json(route))

    def get_external_weights_urls(self, tinker_path: str) -> APIFuture[types.ExternalWeightsUrlsResponse]:
        """Signed download URLs, one per file, of an external weights checkpoint, valid until ``expires``."""
        route = self._external_weights_urls_path(tinker_path)
        return self._future(self._external_weights_urls(route), "ExternalWeightsUrls")

    async def get_external_weights_urls_async(self, tinker_path: str) -> types.ExternalWeightsUrlsResponse:
        route = self._external_weights_urls_path(tinker_path)
        return await self._http.call_async(self._external_weights_urls(route))

    async def _download(self, route: str, dest: Path) -> dict[str, Path]:
        response = await self._external_weights_urls(route)
        root = dest.resolve()
        targets = {name: (root / name).resolve() for name in response.urls}
        unsafe = [name for name, target in targets.items() if not target.is_relative_to(root) or target == root]
        if unsafe:
            raise errors.LoomError(f"refusing to write checkpoint files outside {root}: {unsafe}")
        for name, target in targets.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            await self._http.download(response.urls[name], target)
        return targets

    def download_checkpoint(self, tinker_path: str, dest: str | os.PathLike[str]) -> APIFuture[dict[str, Path]]:
        """Download every file of an external weights checkpoint into the folder ``dest`` (made if missing);
        the result maps each file's relative name to where it was written."""
        route = self._external_weights_urls_path(tinker_path)
        return self._future(self._download(route, Path(dest)), "DownloadCheckpoint")

    async def download_checkpoint_async(self, tinker_path: str, dest: str | os.PathLike[str]) -> dict[str, Path]:
        route = self._external_weights_urls_path(tinker_path)
        return await self._http.call_async(self._download(route, Path(dest)))

    # ------------------------------------------------------------- sessions
    async def _search_sessions(self, request: types.SessionSearchRequest) -> types.SessionSearchResponse:
        body = await self._http.post_json("/api/v1/sessions/search", request.to_wire())
        return types.SessionSearchResponse.model_validate(body)

    async def _assign_session_project(self, session_id: str, project_id: str) -> types.SessionSummary:
        request = types.AssignSessionProjectRequest(project_id=project_id)
        response = await self._http.request("PUT", f"/api/v1/sessions/{session_id}/project", json=request.to_wire())
        return types.SessionSummary.model_validate(response.json())

    async def _export_session_trace(self, session_id: str) -> types.SessionTraceExportResponse:
        body = await self._http.get_json(f"/api/v1/sessions/{session_id}/trace_export")
        return types.SessionTraceExportResponse.model_validate(body)

    async def _whoami(self) -> types.ApiKeySelfResponse:
        return types.ApiKeySelfResponse.model_validate(await self._http.get_json("/api/v1/auth/apikey/me"))

    def search_sessions(self, request: types.SessionSearchRequest) -> APIFuture[types.SessionSearchResponse]:
        """One page of your sessions matching ``request``, newest first; pass ``next_cursor`` on for the next."""
        return self._future(self._search_sessions(request), "SearchSessions")

    async def search_sessions_async(self, request: types.SessionSearchRequest) -> types.SessionSearchResponse:
        return await self._http.call_async(self._search_sessions(request))

    def assign_session_project(self, session_id: str, project_id: str) -> APIFuture[types.SessionSummary]:
        """Move a session (with its training runs and samplers) into ``project_id``."""
        return self._future(self._assign_session_project(session_id, project_id), "AssignSessionProject")

    async def assign_session_project_async(self, session_id: str, project_id: str) -> types.SessionSummary:
        return await self._http.call_async(self._assign_session_project(session_id, project_id))

    def export_session_trace(self, session_id: str) -> APIFuture[types.SessionTraceExportResponse]:
        """A signed, expiring link (no API key needed) to the session's timeline, which ui.perfetto.dev opens."""
        return self._future(self._export_session_trace(session_id), "ExportSessionTrace")

    async def export_session_trace_async(self, session_id: str) -> types.SessionTraceExportResponse:
        return await self._http.call_async(self._export_session_trace(session_id))

    def whoami(self) -> APIFuture[types.ApiKeySelfResponse]:
        """The API key this client uses: its id, name, prefix and tenant (never the key itself)."""
        return self._future(self._whoami(), "Whoami")

    async def whoami_async(self) -> types.ApiKeySelfResponse:
        return await self._http.call_async(self._whoami())

    async def _copy_weights(self, request: types.CopyWeightsRequest) -> str:
        body = await self._http.post_json("/api/v1/copy_weights", request.to_wire())
        return types.CopyWeightsResponse.model_validate(body).tinker_path

    def copy_weights(
        self,
        path: str,
        destination_project_id: str | None = None,
        *,
        session_id: str | None = None,
        model_seq_id: int | None = None,
        ttl_seconds: int | None = None,
    ) -> APIFuture[str]:
        """Copy a checkpoint you can read into a new one you own; the future holds the copy's tinker path. The copy
        lands in a new session of project ``destination_project_id``, or as run ``model_seq_id`` of your session
        ``session_id``. Retries of one call never copy twice (one idempotency key for all of them)."""
        request = types.CopyWeightsRequest(
            source_path=path,
            destination_project_id=destination_project_id,
            session_id=session_id,
            model_seq_id=model_seq_id,
            ttl_seconds=ttl_seconds,
        )
        return self._future(self._copy_weights(request), "CopyWeights")

    async def copy_weights_async(
        self,
        path: str,
        destination_project_id: str | None = None,
        *,
        session_id: str | None = None,
        model_seq_id: int | None = None,
        ttl_seconds: int | None = None,
    ) -> str:
        return await self.copy_weights(
            path, destination_project_id, session_id=session_id, model_seq_id=model_seq_id, ttl_seconds=ttl_seconds
        )

    async def _billing_usage(self, window: types.GetBillingUsageRequest) -> types.BillingUsageResponse:
        body = await self._http.get_json("/api/v1/billing/usage/events", window.to_wire())
        return types.BillingUsageResponse.model_validate(body)

    def get_billing_usage(
        self, starting_on: datetime | str, ending_before: datetime | str
    ) -> APIFuture[types.BillingUsageResponse]:
        """Your usage in [starting_on, ending_before) (whole UTC hours, at most 14 days), hour by hour."""
        window = types.GetBillingUsageRequest.model_validate(
            {"starting_on": starting_on, "ending_before": ending_before}
        )
        return self._future(self._billing_usage(window), "GetBillingUsage")

    async def get_billing_usage_async(
        self, starting_on: datetime | str, ending_before: datetime | str
    ) -> types.BillingUsageResponse:
        return await self.get_billing_usage(starting_on, ending_before)

    async def _checkpoint_storage(self, project_id: str | None) -> types.CurrentCheckpointStorageUsageResponse:
        body = await self._http.get_json("/api/v1/billing/usage/checkpoints/current", {"project_id": project_id})
        return types.CurrentCheckpointStorageUsageResponse.model_validate(body)

    def get_current_checkpoint_storage_usage(
        self, project_id: str | None = None
    ) -> APIFuture[types.CurrentCheckpointStorageUsageResponse]:
        """How many checkpoints you store now and their bytes, per project (only ``project_id``'s, if given)."""
        return self._future(self._checkpoint_storage(project_id), "GetCheckpointStorageUsage")

    async def get_current_checkpoint_storage_usage_async(
        self, project_id: str | None = None
    ) -> types.CurrentCheckpointStorageUsageResponse:
        return await self.get_current_checkpoint_storage_usage(project_id)

    async def _audit_log(self, query: types.GetAuditLogRequest) -> types.AuditLogResponse:
        body = await self._http.get_json("/api/v1/audit", query.to_wire())
        return types.AuditLogResponse.model_validate(body)

    def get_audit_log(
        self,
        event_type: types.AuditEventType = "all",
        day: date | None = None,
        *,
        offset: int = 0,
        limit: int = MAX_PAGE_SIZE,
    ) -> APIFuture[types.AuditLogResponse]:
        """Who created, read, changed or removed your checkpoints, moved your sessions between projects or revoked
        your keys on the UTC ``day`` (default today), oldest first; ``event_type`` keeps one resource's events.
        ``cursor.total_count`` says how many the day holds: page on with ``offset``."""
        query = types.GetAuditLogRequest(event_type=event_type, day=day, offset=offset, limit=limit)
        return self._future(self._audit_log(query), "GetAuditLog")

    async def get_audit_log_async(
        self,
        event_type: types.AuditEventType = "all",
        day: date | None = None,
        *,
        offset: int = 0,
        limit: int = MAX_PAGE_SIZE,
    ) -> types.AuditLogResponse:
        return await self.get_audit_log(event_type, day, offset=offset, limit=limit)
