"""The fleet's agreement on what it runs, from GetInfo answers alone: every refusal
names both sides and the flag that fixes it."""

from __future__ import annotations

import pytest

from coordinator.fleet_model import FleetMismatch, ServiceModel, agree
from jetfed.v1 import info_pb2

DIGITS = [str(d) for d in range(10)]
CNN = "3c4d" + "0" * 60
OTHER = "1a2b" + "f" * 60


def service(name: str, task: str = "mnist", model: str = "mnist-cnn", digest: str = CNN, classes=DIGITS,
            evaluator: bool = False) -> ServiceModel:
    info = info_pb2.GetInfoResponse(task=task, model=model, model_digest=digest, class_names=classes)
    return ServiceModel.of(name, info, is_evaluator=evaluator)


def test_a_fleet_that_agrees_takes_its_first_workers_model() -> None:
    fleet = agree("mnist", None, [service("alice"), service("bob")])
    assert (fleet.task, fleet.model, fleet.digest, fleet.reference) == ("mnist", "mnist-cnn", CNN, "alice")
    assert fleet.describe() == "task mnist, model mnist-cnn (10 classes, digest 3c4d00000000)"


def test_an_older_service_without_a_task_runs_mnist() -> None:
    fleet = agree("mnist", None, [service("alice", task="", digest="")])
    assert fleet.task == "mnist"
    fleet.check(service("bob"))  # no digest to compare with: the manifests will tell


def test_a_worker_on_another_task_is_named_beside_one_on_the_runs() -> None:
    with pytest.raises(FleetMismatch) as caught:
        agree("mnist", None, [service("alice"), service("bob", task="image-folder")])
    assert str(caught.value) == ("worker bob runs task 'image-folder', this run and worker alice run 'mnist': "
                                 "start bob with --task mnist")


def test_no_worker_on_the_runs_task_names_both_fixes() -> None:
    with pytest.raises(FleetMismatch, match=r"worker alice runs task 'image-folder', this run runs 'mnist' \(--task\): "
                                            r"start the boards with --task mnist, or give the coordinator --task "
                                            r"image-folder$"):
        agree("mnist", None, [service("alice", task="image-folder")])


def test_a_task_named_by_its_class_path_is_explained() -> None:
    with pytest.raises(FleetMismatch, match="never package.module:attr"):
        agree("digits.task:Digits", None, [service("alice", task="tiny-digits")])


def test_another_class_list_names_both_lists() -> None:
    with pytest.raises(FleetMismatch) as caught:
        agree("image-folder", None, [service("alice", "image-folder", classes=["cat", "dog"]),
                                     service("bob", "image-folder", classes=["cat", "dog", "bird"])])
    assert str(caught.value) == ("worker bob's classes [cat, dog, bird] differ from alice's [cat, dog]: give every "
                                 "board the same class list (image-folder: the same --option classes=...)")


def test_another_architecture_names_both_digests() -> None:
    with pytest.raises(FleetMismatch) as caught:
        agree("mnist", None, [service("alice"), service("bob", digest=OTHER)])
    assert str(caught.value) == ("worker bob's model mnist-cnn has another architecture (digest 1a2bffffffff vs "
                                 "3c4d00000000) than alice's: the same --model and options (image_size, channels) "
                                 "on every board")


def test_another_model_name_is_refused_before_its_digest() -> None:
    with pytest.raises(FleetMismatch, match="worker bob runs model 'resnet18', this run and worker alice run "
                                            "'mnist-cnn': start bob with --model mnist-cnn"):
        agree("mnist", None, [service("alice"), service("bob", model="resnet18", digest=OTHER)])


def test_the_model_asked_for_must_be_served() -> None:
    with pytest.raises(FleetMismatch, match=r"worker alice runs model 'mnist-cnn', this run trains 'resnet18' "
                                            r"\(--model\)"):
        agree("mnist", "resnet18", [service("alice")])


def test_the_evaluator_is_held_to_the_fleet() -> None:
    fleet = agree("mnist", None, [service("alice")])
    with pytest.raises(FleetMismatch, match="^the evaluator runs task 'image-folder', this run and worker alice run "
                                            "'mnist': start the evaluator with --task mnist$"):
        fleet.check(service("testing", task="image-folder", evaluator=True))


def test_long_class_lists_are_shortened() -> None:
    many = [f"c{i}" for i in range(100)]
    with pytest.raises(FleetMismatch, match=r"\[c0, c1, .*, c11, \.\.\. \(100 in all\)\]"):
        agree("image-folder", None, [service("alice", "image-folder", classes=DIGITS),
                                     service("bob", "image-folder", classes=many)])
