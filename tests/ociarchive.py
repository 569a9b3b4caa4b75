"""Write OCI image layouts and docker-save archives with tarfile + json.

Follows the OCI image-layout spec (``oci-layout``, ``index.json``,
``blobs/sha256/<hex>``; a manifest names the config and the layers by
digest; the config's ``rootfs.diff_ids`` are the digests of the
uncompressed layer tars) and docker save's format (``manifest.json`` with
Config, RepoTags and Layers, one ``<id>/layer.tar`` per layer).  Layers are
given as lists of entries, so tests can write hostile ones by hand.
"""

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path


def entry(name, kind="file", data=b"", *, mode=None, uid=0, gid=0,
          target="", xattrs=None, mtime=1_700_000_000):
    """One layer member: kind is file, dir, symlink, hardlink, chr, blk or
    fifo; ``target`` for links."""
    info = tarfile.TarInfo(name)
    info.uid, info.gid, info.mtime = uid, gid, mtime
    types = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE,
             "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
             "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
             "fifo": tarfile.FIFOTYPE}
    info.type = types[kind]
    info.mode = mode if mode is not None else (
        0o755 if kind in ("dir", "symlink") else 0o644)
    info.linkname = target
    if kind == "file":
        info.size = len(data)
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return info, data if kind == "file" else None


def layer_tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in entries:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tree_layer(root):
    """A layer of every file under the directory ``root`` (owners, modes,
    links kept), as ``tar -C root .`` would."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for path in sorted(Path(root).rglob("*")):
            t.add(path, arcname=str(path.relative_to(root)), recursive=False)
    return buf.getvalue()


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_config(layers, **config):
    """An OCI image config: ``config`` has Env, Entrypoint, Cmd, User,
    WorkingDir, Labels as in docker inspect."""
    return {"architecture": "amd64", "os": "linux",
            "created": "2026-11-29T00:00:00Z", "config": config,
            "rootfs": {"type": "layers",
                       "diff_ids": [sha(la) for la in layers]}}


def _files(layers, config, gz):
    """Blobs of an OCI image: {name: bytes} plus the manifest digest."""
    blobs = {}
    descs = []
    for la in layers:
        blob = gzip.compress(la, mtime=0) if gz else la
        blobs[sha(blob)] = blob
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar"
                      + ("+gzip" if gz else ""), "digest": sha(blob),
                      "size": len(blob)})
    cfg = json.dumps(config).encode()
    blobs[sha(cfg)] = cfg
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(cfg), "size": len(cfg)},
        "layers": descs}).encode()
    blobs[sha(manifest)] = manifest
    return blobs, sha(manifest), len(manifest)


def oci_layout(layers, config, tag="latest", gz=True):
    """{path: bytes} of an OCI image layout."""
    blobs, digest, size = _files(layers, config, gz)
    files = {f"blobs/sha256/{d.split(':')[1]}": b for d, b in blobs.items()}
    files["oci-layout"] = json.dumps({"imageLayoutVersion": "1.0.0"}).encode()
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest, "size": size,
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}).encode()
    return files


def docker_archive(layers, config, tag="test:latest"):
    """{path: bytes} of a docker save archive (the classic format)."""
    cfg = json.dumps(config).encode()
    cfg_name = sha(cfg).split(":")[1] + ".json"
    files = {cfg_name: cfg}
    names = []
    for la in layers:
        name = f"{sha(la).split(':')[1]}/layer.tar"
        files[name] = la
        names.append(name)
    files["manifest.json"] = json.dumps([{"Config": cfg_name,
                                          "RepoTags": [tag],
                                          "Layers": names}]).encode()
    return files


def write_tar(files, path):
    with tarfile.open(path, "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))
    return Path(path)


def write_dir(files, path):
    path = Path(path)
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path
