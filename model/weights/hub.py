"""Hugging Face hub downloads: only when asked, into huggingface_hub's standard cache."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import DownloadError, first_line

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
CONFIG_FILES = ("config.json", "preprocessor_config.json")


def _timeout_from_env(default: float = 10.0) -> float:
    try:
        value = float(os.environ.get("VIT_LENS_HUB_TIMEOUT_S", default))
    except ValueError:
        return default
    return value if value > 0 else default


TIMEOUT_S = _timeout_from_env()  # per request; no answer in time = failure
PROBE_TIMEOUT_S = 5.0


def parse_hub_id(source: str) -> str | None:
    """'hf-hub:org/name' or 'org/name' -> 'org/name'; None when it is not a hub id."""
    s = source[len("hf-hub:") :] if source.startswith("hf-hub:") else source
    parts = s.split("/")
    ok = len(parts) == 2 and all(p and p not in (".", "..") for p in parts)
    ok = ok and all(c.isalnum() or c in "-_." for c in s.replace("/", ""))
    return s if ok else None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_repo(
    repo_id: str,
    *,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Fetch config files and one weights file of repo_id; return the snapshot folder.

    Honours HF_HUB_OFFLINE (only the cache is used). Every failure becomes one DownloadError.
    Files land in the cache only once complete (huggingface_hub writes .incomplete first).
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub import errors as hf_errors

    # one endpoint for the probes and the downloads; HF_ENDPOINT is read now, not at import
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    # a repository already in the cache loads from it, with or without a network (delete it from
    # the cache to download it again)
    told_offline = offline()
    local_only = told_offline or repo_id in cached_repos(cache_dir)
    if not local_only:
        _probe(endpoint)
        _preflight(endpoint, repo_id)

    def fetch(filename: str) -> Path | None:
        if progress:
            progress(f"{'looking up' if local_only else 'downloading'} {repo_id}/{filename}")
        try:
            path = hf_hub_download(
                repo_id,
                filename,
                cache_dir=str(cache_dir) if cache_dir else None,
                endpoint=endpoint,
                etag_timeout=TIMEOUT_S,
                local_files_only=local_only,
            )
        except hf_errors.LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
            if local_only:
                return None
            raise
        except hf_errors.EntryNotFoundError:
            return None
        return Path(path)

    try:
        files = {name: fetch(name) for name in CONFIG_FILES}
        weights = None
        for name in WEIGHT_FILES:
            weights = fetch(name)
            if weights is not None:
                break
    except hf_errors.RepositoryNotFoundError:
        raise DownloadError(f"{repo_id} was not found on the hub (or it is private/gated)") from None
    except hf_errors.GatedRepoError:
        raise DownloadError(f"{repo_id} is gated on the hub; log in and accept its terms first") from None
    except hf_errors.OfflineModeIsEnabled:
        raise DownloadError(f"{repo_id} is not in the local cache and HF_HUB_OFFLINE is set") from None
    except hf_errors.LocalEntryNotFoundError:
        raise DownloadError(
            f"cannot reach the hub to download {repo_id} (no network, or the server did not answer "
            f"within {TIMEOUT_S:.0f} s), and it is not in the local cache"
        ) from None
    except hf_errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise DownloadError(f"the hub answered {status or 'an error'} for {repo_id}: {first_line(e)}") from None
    except (OSError, ValueError) as e:  # network errors, disk full, a body cut short
        raise DownloadError(f"download of {repo_id} failed: {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - httpx2 and friends raise their own types; say it plainly
        raise DownloadError(f"download of {repo_id} failed: {type(e).__name__}: {first_line(e)}") from None
    if weights is None:
        where = "in the local cache (HF_HUB_OFFLINE is set)" if told_offline else "in the repository"
        raise DownloadError(f"{repo_id}: no weights file ({', '.join(WEIGHT_FILES)}) found {where}")
    # a repository cached by a download without config.json has none upstream either: fine online
    if files["config.json"] is None and told_offline:
        raise DownloadError(f"{repo_id}: config.json is not in the local cache (HF_HUB_OFFLINE is set)")
    return weights.parent


def _probe(endpoint: str | None) -> None:
    """Fail in seconds, not after huggingface_hub's 23 s of retries, when the hub is unreachable."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return  # behind a proxy a direct connection says nothing
    url = urlsplit(endpoint or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise DownloadError(
            f"cannot reach {url.scheme}://{url.netloc} ({e.strerror or type(e).__name__}); "
            "check the network, or set HF_HUB_OFFLINE=1 to use only models already in the cache"
        ) from None


def _preflight(endpoint: str, repo_id: str) -> None:
    """One request without retries, through huggingface_hub's own HTTP session (its proxies,
    certificates and token): a hub that answers 5xx or nothing within TIMEOUT_S fails now, not
    after huggingface_hub's retries with backoff (minutes with a slow server)."""
    from huggingface_hub.utils import build_hf_headers, get_session

    url = f"{endpoint}/{repo_id}/resolve/main/config.json"
    try:
        r = get_session().head(url, headers=build_hf_headers(), timeout=TIMEOUT_S, follow_redirects=True)
    except Exception as e:  # noqa: BLE001 - the HTTP client's own exception types
        if "timeout" in type(e).__name__.lower():
            raise DownloadError(
                f"the hub did not answer within {TIMEOUT_S:.0f} s for {repo_id}; try again later"
            ) from None
        raise DownloadError(f"cannot reach the hub for {repo_id}: {first_line(e)}") from None
    if r.status_code >= 500:
        raise DownloadError(f"the hub answered {r.status_code} for {repo_id}; try again later")
    if r.status_code == 404 and r.headers.get("X-Error-Code") in (None, "RepoNotFound"):
        # the hub names a missing file EntryNotFound (fine: config.json is optional); a missing
        # repository RepoNotFound; a server that is not a hub at all says nothing
        raise DownloadError(f"{repo_id} was not found at {endpoint} (it answered 404)")
    # 401/403 (private or gated) and the rest: huggingface_hub turns them into precise messages


def cached_repos(cache_dir: str | Path | None = None) -> list[str]:
    """Repository ids with a complete weights file in the local hub cache (works offline)."""
    try:
        from huggingface_hub import constants, scan_cache_dir

        info = scan_cache_dir(cache_dir or constants.HF_HUB_CACHE)  # read now: its default is bound at import
    except Exception:  # noqa: BLE001 - no cache yet, or unreadable: nothing is cached
        return []
    out = []
    for repo in info.repos:
        names = {f.file_name for rev in repo.revisions for f in rev.files}
        if repo.repo_type == "model" and names & set(WEIGHT_FILES):
            out.append(repo.repo_id)
    return sorted(out)
