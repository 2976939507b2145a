import jax


def test_eight_fake_devices():
    assert jax.device_count() == 8
