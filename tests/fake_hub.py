"""huggingface_hub replaced at its boundary, so hub tests never touch the network."""

from __future__ import annotations


def patch_hub(monkeypatch, serve, *, online: bool = True) -> None:
    """`serve(repo_id, filename)` gives the local path a download would (or raises as the hub does).
    The cache lookup (`local_files_only=True`) finds nothing; the metadata request succeeds when
    `online`, else fails as it does without a network."""
    import huggingface_hub

    def download(repo_id, filename, local_files_only=False, **kwargs):
        if local_files_only:
            raise FileNotFoundError(f"{repo_id}/{filename} is not in the cache")
        return serve(repo_id, filename)

    def metadata(url, **kwargs):
        if not online:
            raise OSError("Temporary failure in name resolution")
        return None

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
