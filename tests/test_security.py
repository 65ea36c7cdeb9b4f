"""Issue 15, probed as an outside client would: a real `monailabel start_server` on a private app copy.

Every attack is refused with the right 4xx; afterwards no file appeared outside the datastore, the app's
weights are byte-identical, /info/ answers 200 and the good template still serves. One server for the module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app_support import free_port, label_info, private_app, start_server, stop_server, tiny_case, wait_for_server
from medlsam.io.volume import CTVolume, read_volume, write_volume

pytestmark = pytest.mark.slow  # a real MONAI Label server

requests = pytest.importorskip("requests")
THREADS = "1"
JUNK = ["j1", "j2", "j3", "j4", "j5"]  # five images whose (newer) final labels cannot serve as templates


def _save(store, image: str, label: Path, info: dict | None = None) -> None:
    store.save_label(image, str(label), "final", info if info is not None else label_info([1]))


def _datastore(folder: Path, data_dir: Path) -> tuple[Path, dict]:
    from monailabel.datastore.local import LocalDatastore

    src = folder / "src"
    kbp1 = tiny_case(data_dir, 1, [1], src)
    kbp2 = tiny_case(data_dir, 2, None, src)
    kbp3 = tiny_case(data_dir, 3, [1], src)
    studies = folder / "studies"
    studies.mkdir()
    shared = folder / "shared_scans"  # a scan the datastore links to (as `make sample-datastore` once did)
    shared.mkdir()
    shutil.copy(kbp2[0], shared / "linked.nii.gz")
    (studies / "linked.nii.gz").symlink_to(shared / "linked.nii.gz")
    for name, path in (
        ("kbp1", kbp1[0]),
        ("kbp2", kbp2[0]),
        ("kbp3", kbp3[0]),
        ("lat", kbp2[0]),
        *((j, kbp2[0]) for j in JUNK),
    ):
        shutil.copy(path, studies / f"{name}.nii.gz")
    image = read_volume(kbp2[0])
    junk = src / "junk"
    junk.mkdir()
    write_volume(np.zeros(image.shape, np.uint8), image, junk / "zeros.nii.gz")
    write_volume(np.ones(image.shape, np.uint8), image, junk / "ones.nii.gz")
    write_volume(np.clip(image.array, -1000, 3000).astype(np.int16) + 1000, image, junk / "ct.nii.gz")
    small = CTVolume(np.zeros((20, 20, 10), np.uint8), image.affine)
    small.array[5:10, 5:10, 3:6] = 1
    write_volume(small.array, small, junk / "small.nii.gz")
    (junk / "text.nii.gz").write_text("not an image\n")
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    _save(store, "kbp1", kbp1[1])
    # written before the gate existed: the five newest final labels are junk, one with a malformed label_info
    _save(store, "j1", junk / "zeros.nii.gz", {"label_info": [{"name": "Brainstem", "idx": "abc"}]})
    for name, file in zip(JUNK[1:], ("ones", "ct", "small", "text")):
        _save(store, name, junk / f"{file}.nii.gz")
    store.update_label_info("kbp1", "final", {"ts": 1})  # the oldest
    return studies, {"kbp1": kbp1, "kbp2": kbp2, "kbp3": kbp3, "junk": junk}


def _tree(folder: Path, skip: list[Path]) -> dict[str, str]:
    """sha1 of every file under folder, except those under skip."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(path == s or s in path.parents for s in skip):
            out[str(path.relative_to(folder))] = hashlib.sha1(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("security")
    studies, files = _datastore(folder, data_dir)
    app = private_app(folder)
    (folder / "outside").mkdir()
    (app / "model" / "train_stats.json").write_text(json.dumps({"epoch": 1, "total_epochs": 4, "status": "running"}))
    port = free_port()
    log, tmp = folder / "server.log", folder / "tmp"
    tmp.mkdir()
    conf = {"models": "medlsam", "threads": THREADS, "adapt_on_save": "false"}
    process = start_server(app, studies, port, conf, log, tmpdir=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, process, log=log)
        model = app / "model"
        skip = [
            studies,
            model / "templates",
            model / "templates.pt",
            model / "templates.json",
            model / "train_stats.json",
            app / "logs",
            app / "bin",
            log,
            tmp,
        ]
        env = {
            "url": url,
            "folder": folder,
            "studies": studies,
            "app": app,
            "files": files,
            "log": log,
            "process": process,
            "skip": skip,
            "tmp": tmp,
        }
        env["before"] = _tree(folder, skip)
        yield env
    finally:
        stop_server(process)


def _unchanged(server) -> None:
    """Nothing written outside the datastore, model/ byte-identical, /info/ 200."""
    assert _tree(server["folder"], server["skip"]) == server["before"]
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200


def _temporary_files(server) -> set[str]:
    """The server's temporary folder (its TMPDIR): an upload is copied there, to be removed after the request."""
    return {path.name for path in server["tmp"].iterdir()}


def _infer(server, model: str, image: str, params: dict | None = None, **kwargs):
    return requests.post(
        f"{server['url']}/infer/{model}",
        params={"image": image, "output": "json"},
        data={"params": json.dumps(params or {})},
        timeout=300,
        **kwargs,
    )


def _put_label(server, image: str, file: Path | bytes, info: dict | None, tag: str = "final", name=None):
    content = file if isinstance(file, bytes) else file.read_bytes()
    return requests.put(
        f"{server['url']}/datastore/label",
        params={"image": image, "tag": tag},
        data={"params": json.dumps(info or {})},
        files={"label": (name or "label.nii.gz", content)},
        timeout=60,
    )


def test_info_and_templates_survive_junk_labels_saved_before(server):
    """Five newer junk final labels (one with idx "abc") neither break /info/ nor crowd out the good template."""
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    assert info["models"]["medlsam"]["labels"]["Brainstem"] == 1
    assert info["train_stats"]["medlam"]["status"] == "stopped"  # a "running" left by a killed run
    result = _infer(server, "medlam", "kbp2")
    assert result.status_code == 200, result.text
    assert result.json()["templates"] == ["kbp1"] and result.json()["boxes"]["Brainstem"]["found"]
    assert "/" not in result.json()["medlam"]["path"] and str(server["folder"]) not in result.text  # no server path
    _unchanged(server)


def test_infer_reads_only_datastore_images(server):
    outside_ct = str(server["files"]["kbp2"][0])  # a real CT, outside the datastore
    answers = []
    for image in (outside_ct, "/etc/passwd", "/etc/nonexistent", "../studies/kbp2", "kbp2/../kbp2"):
        response = _infer(server, "sam", image, {"foreground": [[32, 34, 8]]})
        assert response.status_code == 404, (image, response.text)
        answers.append(response.json()["detail"].replace(image, "<id>"))
        via_params = _infer(server, "sam", "kbp2", {"image": image, "foreground": [[32, 34, 8]]})
        assert via_params.status_code == 404, (image, via_params.text)
    assert len(set(answers)) == 1  # existing and missing files answer alike
    upload = requests.post(
        f"{server['url']}/infer/sam",
        data={"params": "{}"},
        files={"file": ("x.nii.gz", Path(outside_ct).read_bytes())},
        timeout=60,
    )
    assert upload.status_code == 400 and "file" in upload.json()["detail"]
    _unchanged(server)


def test_uploads_cannot_leave_the_datastore(server):
    url, app, ct = server["url"], server["app"], server["files"]["kbp2"][0].read_bytes()
    temporary = _temporary_files(server)
    escaped = requests.put(
        f"{url}/datastore/", params={"image": "../escaped_img"}, files={"file": ("x.nii.gz", ct)}, timeout=60
    )
    assert escaped.status_code == 400 and "image id" in escaped.json()["detail"], escaped.text
    script = requests.put(f"{url}/datastore/image", params={"image": "evil"}, files={"file": ("evil.sh", b"#!")})
    assert script.status_code == 400, script.text
    not_ct = requests.put(f"{url}/datastore/image", params={"image": "notct"}, files={"file": ("n.nii.gz", b"x")})
    assert not_ct.status_code == 400 and "/tmp" not in not_ct.text and "/" not in not_ct.json()["detail"], not_ct.text
    existing = requests.put(f"{url}/datastore/image", params={"image": "kbp1"}, files={"file": ("k.nii.gz", ct)})
    assert existing.status_code == 409, existing.text  # a template's image is not silently replaced
    for tag in (str(server["folder"] / "outside"), str(app / "model"), "../../outside", "final/../../x"):
        response = _put_label(server, "kbp2", server["files"]["kbp1"][1], label_info([1]), tag=tag, name="medlam.pt")
        assert response.status_code == 400 and "tag" in response.json()["detail"], (tag, response.text)
    weights = requests.put(f"{url}/model/medlsam", files={"file": ("medlam.pt", b"junk")}, timeout=30)
    assert weights.status_code == 403, weights.text
    assert not list((server["folder"] / "outside").iterdir()) and not (app / "model" / "medlam.pt").exists()
    assert _temporary_files(server) == temporary  # each refused upload's temporary copy is removed
    _unchanged(server)


def test_bad_labels_are_refused_and_nothing_is_written(server):
    junk, good = server["files"]["junk"], server["files"]["kbp3"][1]
    temporary = _temporary_files(server)
    cases = [  # (image, label file, label_info, what the refusal names); junk/* are on kbp2's (= lat's) grid
        ("kbp3", good, {"label_info": [{"name": "Brainstem", "idx": "abc"}]}, "idx"),
        ("kbp3", good, {"label_info": [{"name": "Brainstem", "idx": 1}, {"name": "Brainstem", "idx": 2}]}, "twice"),
        ("kbp3", good, {"label_info": [{"name": "", "idx": 1}]}, "name"),
        ("kbp3", good, {"label_info": [{"name": "Liver", "idx": 5}]}, "no entry in label_info"),
        ("kbp3", server["files"]["kbp3"][0], label_info([1]), "values"),  # the CT itself (negative HU)
        ("kbp3", junk / "zeros.nii.gz", label_info([1]), "grid"),  # another image's grid
        ("lat", junk / "zeros.nii.gz", label_info([1]), "empty"),
        ("lat", junk / "ones.nii.gz", label_info([1]), "cover"),
        ("lat", junk / "ct.nii.gz", label_info([1]), "distinct values"),
        ("lat", junk / "small.nii.gz", label_info([1]), "shape"),
        ("lat", junk / "text.nii.gz", label_info([1]), "cannot be read"),
    ]
    for image, file, info, needle in cases:
        response = _put_label(server, image, file, info)
        assert response.status_code == 400 and needle in response.json()["detail"], (file.name, info, response.text)
    assert not list(server["studies"].glob("labels/final/kbp3*")) and not list(
        server["studies"].glob("labels/final/lat*")
    )
    unknown = _put_label(server, "nosuch", good, label_info([1]))
    assert unknown.status_code == 404, unknown.text
    relabel = requests.put(
        f"{server['url']}/datastore/label/info",
        params={"label": "kbp1", "tag": "final"},
        data={"info": json.dumps({"label_info": [{"name": "X", "idx": "abc"}]})},
        timeout=30,
    )
    assert relabel.status_code == 400, relabel.text
    assert _temporary_files(server) == temporary  # no refused label left a temporary copy behind
    planted = _infer(server, "medlam", "kbp2", {"save_label": True, "label_tag": "final"})
    assert planted.status_code == 400 and "label_tag" in planted.json()["detail"], planted.text
    assert not list(server["studies"].glob("labels/final/kbp2*"))
    served = _infer(server, "medlam", "kbp2")
    assert served.status_code == 200 and served.json()["templates"] == ["kbp1"], served.text
    _unchanged(server)


@pytest.mark.parametrize(
    "model,params,needle",
    [
        ("sam_3d", {"foreground": [[32, 34, 8]], "min_iou": "NaN"}, "min_iou"),
        ("sam_3d", {"foreground": [[32, 34, 8]], "max_slices": -5}, "max_slices"),
        ("medlam", {"refine": "maybe"}, "refine"),
        ("sam", {"foreground": [[32, 34, 8], [30, 30, 9]]}, "one slice"),
        ("medlam", {"result_dtype": "complex64"}, "result_dtype"),
    ],
)
def test_bad_infer_parameters_are_400(server, model, params, needle):
    response = _infer(server, model, "kbp2", params)
    assert response.status_code == 400 and needle in response.json()["detail"], response.text


def test_bad_requests_are_400_naming_the_parameter(server):
    url = server["url"]
    for raw, needle in (("not json", "params"), ("[1, 2]", "params")):
        response = requests.post(f"{url}/infer/sam", params={"image": "kbp2"}, data={"params": raw}, timeout=30)
        assert response.status_code == 400 and needle in response.json()["detail"], response.text
        label = requests.put(
            f"{url}/datastore/label",
            params={"image": "kbp3"},
            data={"params": raw},
            files={"label": ("l.nii.gz", b"x")},
            timeout=30,
        )
        assert label.status_code == 400 and needle in label.json()["detail"], label.text
    assert requests.delete(f"{url}/datastore/", params={"id": "nosuch"}, timeout=30).status_code == 404
    assert requests.delete(f"{url}/datastore/label", params={"id": "kbp2", "tag": "final"}).status_code == 404
    for options, needle in (
        ({"epochs": -1}, "epochs"),
        ({"epochs": 10**9}, "epochs"),
        ({"epochs": "abc"}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"epoch": 2}, "accepted"),
    ):
        response = requests.post(f"{url}/train/medlam", json=options, timeout=30)
        assert response.status_code == 400 and needle in response.json()["detail"], (options, response.text)
    assert requests.post(f"{url}/train/nosuch", json={}, timeout=30).status_code == 404
    assert requests.get(f"{url}/train/", timeout=30).status_code == 404  # nothing was started
    _unchanged(server)


def test_info_answers_while_medlsam_runs(server):
    """/info/ and a light request answer within seconds while an inference of a fresh image runs."""
    result = {}

    def run():
        tic = time.perf_counter()
        result["response"] = _infer(server, "medlsam", "lat", {"prior_weight": 0})
        result["seconds"] = time.perf_counter() - tic

    worker = threading.Thread(target=run)
    tic = time.perf_counter()
    worker.start()
    time.sleep(0.5)
    latencies = []
    while worker.is_alive():
        start = time.perf_counter()
        assert requests.get(f"{server['url']}/info/", timeout=60).status_code == 200
        if worker.is_alive():  # answered while the inference still ran
            latencies.append(time.perf_counter() - start)
        time.sleep(0.2)
    worker.join()
    assert result["response"].status_code == 200, result["response"].text
    assert str(server["folder"]) not in result["response"].text
    assert latencies, f"the inference ({time.perf_counter() - tic:.1f} s) ended before /info/ could be probed"
    assert max(latencies) < 3.0, (latencies, result["seconds"])
    log = server["log"].read_text()
    assert "medlsam image=lat done in" in log and "encode" in log


def test_label_values_beyond_uint8_are_not_wrapped(server):
    label = read_volume(server["files"]["kbp3"][1])
    jaw = server["folder"] / "src" / "jaw.nii.gz"
    write_volume(np.where(label.array == 1, 300, 0).astype(np.uint16), label, jaw)
    saved = _put_label(server, "kbp3", jaw, {"label_info": [{"name": "Jaw", "idx": 300}]})
    assert saved.status_code == 200, saved.text
    response = requests.post(
        f"{server['url']}/infer/medlam",
        params={"image": "kbp2", "output": "image"},
        data={"params": json.dumps({"result_dtype": "uint8", "organs": ["Jaw"]})},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    path = server["folder"] / "jaw_result.nii.gz"
    path.write_bytes(response.content)
    values = set(np.unique(read_volume(path).array).tolist())
    path.unlink()
    assert values == {0, 300}, values


def test_a_bad_published_model_is_set_aside(server):
    model = server["app"] / "model"
    from medlsam.paths import SHIPPED_MEDLAM

    shipped = SHIPPED_MEDLAM.read_bytes()
    (model / "medlam.pt").write_bytes(shipped[: len(shipped) // 2])  # a truncated publication
    response = _infer(server, "medlam", "kbp2")
    assert response.status_code == 200, response.text
    assert response.json()["medlam"]["path"] == "pretrained_medlam.pt"
    assert not (model / "medlam.pt").exists() and (model / "medlam.pt.rejected").is_file()
    assert "set aside as medlam.pt.rejected" in server["log"].read_text()


def test_a_failed_training_ends_failed(server, tmp_path):
    """Training that fails writes status "failed" with the error (in process: no subprocess needed)."""
    from monailabel.datastore.local import LocalDatastore

    sys.path.insert(0, str(server["app"]))
    try:
        from lib.models import Models
        from lib.trainers.medlam import MedLAMTrainer

        trainer = MedLAMTrainer(Models(tmp_path, {}))
        empty = LocalDatastore(str(tmp_path / "empty"), extensions=("*.nii.gz",), auto_reload=False)
        with pytest.raises(Exception, match="no usable CT"):
            trainer({"epochs": 1}, empty)
        stats = json.loads((tmp_path / "train_stats.json").read_text())
        assert stats["status"] == "failed" and "no usable CT" in stats["error"]
    finally:
        sys.path.remove(str(server["app"]))


class _FakeDatastore:
    """get_labeled_images & co. over a dict {id: ts}; every id has a final label (files from `files`)."""

    def __init__(self, files: tuple[Path, Path], stamps: dict[str, int]):
        self.files, self.stamps = files, stamps

    def get_labeled_images(self):
        return list(self.stamps)

    def get_label_uri(self, image_id, tag):
        return str(self.files[1])

    def get_image_uri(self, image_id):
        return str(self.files[0])

    def get_label_info(self, image_id, tag):
        return {"label_info": [{"name": "Brainstem", "idx": 1}], "ts": self.stamps[image_id]}


def test_a_bank_build_for_outdated_labels_is_cancelled(tmp_path, data_dir):
    """A build whose templates changed stops at the next template, and /info/'s names never wait for it."""
    app = private_app(tmp_path)
    files = tiny_case(data_dir, 1, [1], tmp_path / "src")
    sys.path.insert(0, str(app))
    try:
        from lib.models import Models
        from lib.template_source import NoTemplatesError, TemplateSource
        from medlsam.errors import TemplateError

        datastore = _FakeDatastore(files, {"a": 3, "b": 2, "c": 1})
        store = TemplateSource(Models(app / "model", {}), app / "model", lambda: datastore, 5)
        calls = []

        def slow_template(model, fingerprint, item):
            calls.append(item["id"])
            time.sleep(1.0)
            raise TemplateError(f"{item['id']}: not usable")

        store._template_bank = slow_template
        first = {}
        worker = threading.Thread(target=lambda: first.setdefault("error", _raises(store.bank)))
        worker.start()
        time.sleep(0.3)
        datastore.stamps = {"d": 4}  # the labels changed: the running build is outdated
        tic = time.perf_counter()
        assert store.label_names() == {"Brainstem": 1} and time.perf_counter() - tic < 0.5
        with pytest.raises(NoTemplatesError):
            store.bank()
        worker.join(timeout=10)
        assert isinstance(first["error"], NoTemplatesError)
        assert calls[0] == "a" and "b" not in calls and "c" not in calls, calls  # stopped after its first template
    finally:
        sys.path.remove(str(app))


def _raises(function):
    try:
        function()
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


# ---------------------------------------------------------------------------------------------- issue 26: round two


def _unchanged_since(server, before: dict[str, str]) -> None:
    """Nothing written outside the datastore since ``before`` (a _tree snapshot), /info/ 200."""
    assert _tree(server["folder"], server["skip"]) == before
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200


def _nrrd_header(data_file: str, shape=(64, 64, 24)) -> bytes:
    """A 281-byte-style detached NRRD header whose voxels are another file on the server."""
    sizes = " ".join(map(str, shape))
    return (
        f"NRRD0004\ntype: short\ndimension: 3\nsizes: {sizes}\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
        f"space: left-posterior-superior\nencoding: raw\nendian: little\ndata file: {data_file}\n\n"
    ).encode()


def _nifti_claiming(shape: tuple[int, int, int], payload: bytes = b"") -> bytes:
    """A gzip NIfTI whose header claims ``shape`` int16 voxels but holds only ``payload``."""
    import gzip

    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    return gzip.compress(header.binaryblock + b"\0" * 4 + payload)


def _peak_rss_mb(process) -> float:
    """The server process's peak resident memory (VmHWM), MB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_session_archives_are_never_extracted(server):
    """PUT /session/?uncompress=true with a tar whose members climb out (../, absolute, symlink) is refused; nothing
    lands anywhere; a plain image still makes a session, a detached header does not."""
    before = _tree(server["folder"], server["skip"])
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
        files={"files": ("d.nrrd", _nrrd_header(str(server["files"]["kbp2"][0])))},
        timeout=60,
    )
    assert detached.status_code == 400 and "detached" in detached.json()["detail"], detached.text
    plain = requests.put(
        f"{url}/session/", files={"files": ("kbp2.nii.gz", server["files"]["kbp2"][0].read_bytes())}, timeout=60
    )
    assert plain.status_code == 200, plain.text
    assert requests.delete(f"{url}/session/{plain.json()['session_id']}", timeout=30).status_code == 200
    _unchanged_since(server, before)


def test_edit_never_reads_a_server_path_named_by_the_request(server):
    """`label` in a request's params names a structure; a server file it names is never read, and the answer for
    an existing path is the one for a missing path."""
    before = _tree(server["folder"], server["skip"])
    clicks = {"Brainstem": [[32, 34, 8]]}
    existing = str(server["studies"] / "labels" / "final" / "kbp1.nii.gz")
    assert Path(existing).is_file()
    answers = []
    for path in (existing, "/nonexistent/kbp1.nii.gz"):
        response = _infer(server, "edit", "kbp2", {**clicks, "label": path, "label_file": path})
        assert response.status_code == 400, response.text
        answers.append(response.json()["detail"].replace(path, "<path>"))
    assert answers[0] == answers[1] and "label" in answers[0]
    _unchanged_since(server, before)


def test_files_that_name_other_files_are_refused_at_upload(server):
    """A detached NRRD header, an .mha whose ElementDataFile and a .nii whose .img pair lie elsewhere: 400 naming
    why, as images and as labels."""
    before = _tree(server["folder"], server["skip"])
    import nibabel

    url, target = server["url"], server["files"]["kbp2"][0]
    raw = server["folder"] / "outside" / "voxels.raw"
    raw.write_bytes(np.zeros((64, 64, 24), np.int16).tobytes())
    pair = bytearray(nibabel.Nifti1Header().binaryblock)
    pair[344:348] = b"ni1\x00"
    uploads = [
        ("d.nrrd", _nrrd_header(str(raw)), "detached NRRD"),
        ("d.nrrd", _nrrd_header(str(target)), "detached NRRD"),
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
        label = _put_label(server, "kbp3", content, label_info([1]), name=name)
        assert label.status_code == 400 and needle in label.json()["detail"], (name, label.text)
    raw.unlink()
    assert "detached" not in requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).text
    _unchanged_since(server, before)


def test_oversized_and_forged_headers_are_refused_before_their_voxels(server):
    """A 70-byte .nii.gz claiming 1000^3 voxels and one claiming a real scan's size with no voxels: 400 at once,
    as image, label and session, and the server's peak memory rises by less than 500 MB."""
    before = _tree(server["folder"], server["skip"])
    url, peak = server["url"], _peak_rss_mb(server["process"])
    bomb = _nifti_claiming((1000, 1000, 1000))
    forged = _nifti_claiming((512, 512, 300), b"\0" * 1024)
    assert len(bomb) < 100
    for content, needle in ((bomb, "budget"), (forged, "truncated or forged")):
        image = requests.put(f"{url}/datastore/image", params={"image": "bomb"}, files={"file": ("b.nii.gz", content)})
        assert image.status_code == 400 and needle in image.json()["detail"], image.text
        label = _put_label(server, "kbp3", content, label_info([1]))
        assert label.status_code == 400 and needle in label.json()["detail"], label.text
        session = requests.put(f"{url}/session/", files={"files": ("b.nii.gz", content)}, timeout=60)
        assert session.status_code == 400 and needle in session.json()["detail"], session.text
    assert _peak_rss_mb(server["process"]) - peak < 500
    _unchanged_since(server, before)


def test_deleting_a_linked_scan_removes_the_link_only(server):
    """DELETE /datastore/ of an image that is a symlink unlinks the datastore's entry; the file it points to stays."""
    before = _tree(server["folder"], server["skip"])
    link, target = server["studies"] / "linked.nii.gz", server["folder"] / "shared_scans" / "linked.nii.gz"
    assert link.is_symlink() and target.is_file()
    content = target.read_bytes()
    response = requests.delete(f"{server['url']}/datastore/", params={"id": "linked"}, timeout=30)
    assert response.status_code == 200, response.text
    assert not link.exists() and not link.is_symlink()
    assert target.is_file() and target.read_bytes() == content
    _unchanged_since(server, before)


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
        response = _infer(server, model, "kbp2", params)
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
    before = _tree(server["folder"], server["skip"])
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
        response = _put_label(server, "kbp3", file, info)
        assert response.status_code == 400 and needle in response.json()["detail"], (info, response.text)
    odd.unlink()
    labels = requests.get(f"{server['url']}/info/", timeout=30).json()["labels"]
    assert not any("<" in name or "label_301" == name for name in labels), labels
    _unchanged_since(server, before)
