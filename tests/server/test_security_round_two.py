"""Issue 26 (security, round two), probed as an outside client would on the same real server as test_security.py:
session archives, paths named by requests, files naming other files, forged headers, linked scans, web origins and
hosts, every option checked before work, inferences stopped when their client leaves, label names."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from security_support import (
    infer,
    nifti_claiming,
    nrrd_header,
    peak_rss_mb,
    put_label,
    tree,
    unchanged_since,
)

from app_support import label_info
from medlsam.io.volume import read_volume, write_volume

pytestmark = pytest.mark.slow  # a real MONAI Label server

requests = pytest.importorskip("requests")


@pytest.fixture(scope="module")
def server(security_server):
    return security_server


def test_session_archives_are_never_extracted(server):
    """PUT /session/?uncompress=true with a tar whose members climb out (../, absolute, symlink) is refused; nothing
    lands anywhere; a plain image still makes a session, a detached header does not."""
    before = tree(server["folder"], server["skip"])
    import io
    import tarfile

    url, app = server["url"], server["app"]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("../../app/lib/configs/evil.py", str(app / "lib" / "configs" / "evil2.py")):
            data = b"open('/tmp/pwned', 'w').write('x')\n"
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        link = tarfile.TarInfo("weights.pt")
        link.type, link.linkname = tarfile.SYMTYPE, str(app / "model" / "pretrained_medlam.pt")
        tar.addfile(link)
    archive = requests.put(
        f"{url}/session/", params={"uncompress": "true"}, files={"files": ("a.tar.gz", buffer.getvalue())}, timeout=60
    )
    assert archive.status_code == 400 and "uncompress" in archive.json()["detail"], archive.text
    assert not list(app.rglob("evil*.py")) and not Path("/tmp/pwned").exists()
    detached = requests.put(
        f"{url}/session/",
        files={"files": ("d.nrrd", nrrd_header(str(server["files"]["kbp2"][0])))},
        timeout=60,
    )
    assert detached.status_code == 400 and "detached" in detached.json()["detail"], detached.text
    plain = requests.put(
        f"{url}/session/", files={"files": ("kbp2.nii.gz", server["files"]["kbp2"][0].read_bytes())}, timeout=60
    )
    assert plain.status_code == 200, plain.text
    assert requests.delete(f"{url}/session/{plain.json()['session_id']}", timeout=30).status_code == 200
    unchanged_since(server, before)


def test_edit_never_reads_a_server_path_named_by_the_request(server):
    """`label` in a request's params names a structure; a server file it names is never read, and the answer for
    an existing path is the one for a missing path."""
    before = tree(server["folder"], server["skip"])
    clicks = {"Brainstem": [[32, 34, 8]]}
    existing = str(server["studies"] / "labels" / "final" / "kbp1.nii.gz")
    assert Path(existing).is_file()
    answers = []
    for path in (existing, "/nonexistent/kbp1.nii.gz"):
        response = infer(server, "edit", "kbp2", {**clicks, "label": path, "label_file": path})
        assert response.status_code == 400, response.text
        answers.append(response.json()["detail"].replace(path, "<path>"))
    assert answers[0] == answers[1] and "label" in answers[0]
    unchanged_since(server, before)


def test_files_that_name_other_files_are_refused_at_upload(server):
    """A detached NRRD header, an .mha whose ElementDataFile and a .nii whose .img pair lie elsewhere: 400 naming
    why, as images and as labels."""
    before = tree(server["folder"], server["skip"])
    import nibabel

    url, target = server["url"], server["files"]["kbp2"][0]
    raw = server["folder"] / "outside" / "voxels.raw"
    raw.write_bytes(np.zeros((64, 64, 24), np.int16).tobytes())
    pair = bytearray(nibabel.Nifti1Header().binaryblock)
    pair[344:348] = b"ni1\x00"
    uploads = [
        ("d.nrrd", nrrd_header(str(raw)), "detached NRRD"),
        ("d.nrrd", nrrd_header(str(target)), "detached NRRD"),
        (
            "m.mha",
            f"ObjectType = Image\nNDims = 3\nDimSize = 64 64 24\nElementType = MET_SHORT\n"
            f"ElementDataFile = {raw}\n".encode(),
            "ElementDataFile",
        ),
        ("p.nii", bytes(pair), "separate .img"),
    ]
    for name, content, needle in uploads:
        image = requests.put(f"{url}/datastore/image", params={"image": "detached"}, files={"file": (name, content)})
        assert image.status_code == 400 and needle in image.json()["detail"], (name, image.text)
        label = put_label(server, "kbp3", content, label_info([1]), name=name)
        assert label.status_code == 400 and needle in label.json()["detail"], (name, label.text)
    raw.unlink()
    assert "detached" not in requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).text
    unchanged_since(server, before)


def test_oversized_and_forged_headers_are_refused_before_their_voxels(server):
    """A 70-byte .nii.gz claiming 1000^3 voxels and one claiming a real scan's size with no voxels: 400 at once,
    as image, label and session, and the server's peak memory rises by less than 500 MB."""
    before = tree(server["folder"], server["skip"])
    url, peak = server["url"], peak_rss_mb(server["process"])
    bomb = nifti_claiming((1000, 1000, 1000))
    forged = nifti_claiming((512, 512, 300), b"\0" * 1024)
    assert len(bomb) < 100
    for content, needle in ((bomb, "budget"), (forged, "truncated or forged")):
        image = requests.put(f"{url}/datastore/image", params={"image": "bomb"}, files={"file": ("b.nii.gz", content)})
        assert image.status_code == 400 and needle in image.json()["detail"], image.text
        label = put_label(server, "kbp3", content, label_info([1]))
        assert label.status_code == 400 and needle in label.json()["detail"], label.text
        session = requests.put(f"{url}/session/", files={"files": ("b.nii.gz", content)}, timeout=60)
        assert session.status_code == 400 and needle in session.json()["detail"], session.text
    assert peak_rss_mb(server["process"]) - peak < 500
    unchanged_since(server, before)


def test_deleting_a_linked_scan_removes_the_link_only(server):
    """DELETE /datastore/ of an image that is a symlink unlinks the datastore's entry; the file it points to stays."""
    before = tree(server["folder"], server["skip"])
    link, target = server["studies"] / "linked.nii.gz", server["folder"] / "shared_scans" / "linked.nii.gz"
    assert link.is_symlink() and target.is_file()
    content = target.read_bytes()
    response = requests.delete(f"{server['url']}/datastore/", params={"id": "linked"}, timeout=30)
    assert response.status_code == 200, response.text
    assert not link.exists() and not link.is_symlink()
    assert target.is_file() and target.read_bytes() == content
    unchanged_since(server, before)


def test_other_origins_foreign_hosts_and_the_log_are_refused(server):
    """No CORS grant for a foreign page, DNS-rebinding Host headers refused, /logs/ not served."""
    url = server["url"]
    preflight = requests.options(
        f"{url}/datastore/image",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "PUT"},
        timeout=30,
    )
    assert "access-control-allow-origin" not in {k.lower() for k in preflight.headers}, preflight.headers
    simple = requests.get(f"{url}/info/", headers={"Origin": "http://evil.example"}, timeout=30)
    assert simple.status_code == 200 and "access-control-allow-origin" not in {k.lower() for k in simple.headers}
    rebound = requests.get(f"{url}/info/", headers={"Host": "evil.example"}, timeout=30)
    assert rebound.status_code == 400 and "allowed_hosts" in rebound.json()["detail"], rebound.text
    port = url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert requests.get(f"{url}/info/", headers={"Host": host}, timeout=30).status_code == 200
    assert requests.get(f"{url}/logs/", timeout=30).status_code == 404
    assert requests.get(f"{url}/logs/", params={"lines": 10}, timeout=30).status_code == 404


def test_every_option_and_click_set_is_checked_before_any_work(server):
    """Floods of clicks, a voxel both foreground and background, bad output options, an absent device: 400 naming
    the problem, answered before any inference ran (the log shows no new finished inference)."""
    flood = [[32, 34, 8]] * 10_000
    done = server["log"].read_text().count(" done in ")
    cases = [
        ("sam_3d", {"foreground": flood}, "at most 200"),
        ("edit", {"Brainstem": flood}, "at most 200"),
        ("edit", {"foreground": flood, "label": "Brainstem"}, "at most 200"),
        ("sam_3d", {"foreground": [[32, 34, 8]], "background": [[32, 34, 8]]}, "both as foreground and as background"),
        ("medlsam", {"result_extension": ".exe"}, "result_extension"),
        ("medlsam", {"result_dtype": "complex64"}, "result_dtype"),
        ("edit", {"Brainstem": [[32, 34, 8]], "reach_mm": -1}, "reach_mm"),
        ("medlsam", {"device": "cuda:99"}, "cuda:99"),
        ("sam", {"foreground": [[32, 34, 8]], "label": "<img src=x onerror=alert(1)>"}, "plain text"),
    ]
    for model, params, needle in cases:
        response = infer(server, model, "kbp2", params)
        assert response.status_code == 400 and needle in response.json()["detail"], (model, needle, response.text)
    assert server["log"].read_text().count(" done in ") == done


def test_an_inference_stops_when_its_client_leaves(server):
    """A client that gives up after a second: the inference stops at its next check, frees its slot and says why in
    the log; the server keeps serving."""
    log = server["log"]
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(
            f"{server['url']}/infer/sam_3d",
            params={"image": "kbp3", "output": "json"},
            data={"params": json.dumps({"foreground": [[32, 34, 12]], "min_iou": 0})},
            timeout=1.0,
        )
    deadline = time.time() + 120
    while "client is no longer waiting" not in log.read_text() and time.time() < deadline:
        time.sleep(0.5)
    assert "client is no longer waiting" in log.read_text()
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200


def test_final_labels_name_every_value_in_plain_text(server):
    """A value without a name, a name for an absent value, a name with markup: 400; /info/ shows no markup."""
    before = tree(server["folder"], server["skip"])
    label = read_volume(server["files"]["kbp3"][1])
    odd = server["folder"] / "src" / "odd.nii.gz"
    write_volume(np.where(label.array == 1, 301, 0).astype(np.uint16), label, odd)
    good = server["files"]["kbp3"][1]
    cases = [
        (odd, {}, "no entry in label_info"),
        (good, {"label_info": [{"name": "Brainstem", "idx": 1}, {"name": "Liver", "idx": 9}]}, "does not hold"),
        (good, {"label_info": [{"name": "<img src=x onerror=alert(1)>", "idx": 1}]}, "plain text"),
    ]
    for file, info, needle in cases:
        response = put_label(server, "kbp3", file, info)
        assert response.status_code == 400 and needle in response.json()["detail"], (info, response.text)
    odd.unlink()
    labels = requests.get(f"{server['url']}/info/", timeout=30).json()["labels"]
    assert not any("<" in name or "label_301" == name for name in labels), labels
    unchanged_since(server, before)
