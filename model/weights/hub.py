"""Hugging Face hub downloads: only when asked, into huggingface_hub's standard cache."""

from __future__ import annotations

import logging
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import DownloadError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
CONFIG_FILES = ("config.json", "preprocessor_config.json")
TIMEOUT_S = float(os.environ.get("VIT_LENS_HUB_TIMEOUT_S", "10"))  # per request; no answer in time = failure
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
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    local_only = offline()
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
        return _download(repo_id, fetch, local_only)
    except DownloadError:
        _remove_partials(repo_id, cache_dir)
        raise


def _download(repo_id: str, fetch: Callable[[str], Path | None], local_only: bool) -> Path:
    from huggingface_hub import errors as hf_errors

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
        raise DownloadError(f"the hub answered {status or 'an error'} for {repo_id}: {_first_line(e)}") from None
    except (OSError, ValueError) as e:  # network errors, disk full, a body cut short
        raise DownloadError(f"download of {repo_id} failed: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - httpx2 and friends raise their own types; say it plainly
        raise DownloadError(f"download of {repo_id} failed: {type(e).__name__}: {_first_line(e)}") from None
    if weights is None:
        where = "in the local cache (HF_HUB_OFFLINE is set)" if local_only else "in the repository"
        raise DownloadError(f"{repo_id}: no weights file ({', '.join(WEIGHT_FILES)}) found {where}")
    if files["config.json"] is None and local_only:
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


def _preflight(endpoint: str | None, repo_id: str) -> None:
    """One request without retries: a hub that answers 5xx or nothing within TIMEOUT_S fails now,
    not after huggingface_hub's retries with backoff (which take minutes with a slow server)."""
    from huggingface_hub import constants

    base = (endpoint or constants.ENDPOINT).rstrip("/")
    req = urllib.request.Request(f"{base}/{repo_id}/resolve/main/config.json", method="HEAD")
    slow = f"the hub did not answer within {TIMEOUT_S:.0f} s for {repo_id}; try again later"
    try:
        urllib.request.urlopen(req, timeout=TIMEOUT_S).close()
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            raise DownloadError(f"the hub answered {e.code} for {repo_id}; try again later") from None
        if e.code == 404 and e.headers.get("X-Error-Code", "RepoNotFound") == "RepoNotFound":
            raise DownloadError(f"{repo_id} was not found at {base} (it answered 404)") from None
        # a missing config.json, 401/403 and friends: huggingface_hub turns them into precise messages
    except TimeoutError:
        raise DownloadError(slow) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise DownloadError(slow) from None
        raise DownloadError(f"cannot reach the hub for {repo_id}: {e.reason}") from None
    except OSError as e:
        raise DownloadError(f"cannot reach the hub for {repo_id}: {_first_line(e)}") from None


def _remove_partials(repo_id: str, cache_dir: str | Path | None) -> None:
    """Delete the half-written blobs a failed download left (huggingface_hub keeps them to resume)."""
    from huggingface_hub import constants

    folder = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "blobs"
    for p in folder.glob("*.incomplete"):
        try:
            p.unlink()
        except OSError as e:  # a concurrent download of the same file may hold it; it cleans up itself
            log.warning("could not remove %s: %s", p, e)


def cached_repos(cache_dir: str | Path | None = None) -> list[str]:
    """Repository ids with a complete weights file in the local hub cache (works offline)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir(cache_dir)
    except Exception:  # noqa: BLE001 - no cache yet, or unreadable: nothing is cached
        return []
    out = []
    for repo in info.repos:
        names = {f.file_name for rev in repo.revisions for f in rev.files}
        if repo.repo_type == "model" and names & set(WEIGHT_FILES):
            out.append(repo.repo_id)
    return sorted(out)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
