"""The EMA teacher on the networks nnU-Net builds from the embedded sample's plans (default and ResEnc M
planner, 2d and 3d_fullres, with deep supervision). Those networks list one tensor under several
``state_dict`` names; a toy network has no such aliases and cannot show an update applied once per name.

The plans in ``tests/data`` are nnU-Net 2.8.1's own (conftest.planned_network)."""
import pytest
import torch

from conftest import PLANNED, planned_network
from nnunet_contrast.training.thresholds import FixedThreshold
from nnunet_contrast.training.pseudo_labels import EmaTeacher



@pytest.mark.parametrize("architecture", sorted(PLANNED))
@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_one_update_averages_every_tensor_once(architecture, configuration):
    torch.manual_seed(0)
    student = planned_network(architecture, configuration)
    state = student.state_dict()
    distinct = {value.data_ptr() for value in state.values()}
    assert len(state) > len(distinct)  # the aliases this test is about
    decay = 0.9
    teacher = EmaTeacher(student, decay=decay, threshold=FixedThreshold(0.9))
    with torch.no_grad():  # the student moves away from the teacher, every tensor differently
        for value in list(student.parameters()) + [b for b in student.buffers() if b.is_floating_point()]:
            value.add_(torch.randn_like(value))
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    teacher.update(student)
    after = teacher.state_dict()
    for name, value in student.state_dict().items():
        expected = decay * before[name] + (1 - decay) * value if value.is_floating_point() else value
        torch.testing.assert_close(after[name], expected, rtol=1e-6, atol=1e-6, msg=name)
