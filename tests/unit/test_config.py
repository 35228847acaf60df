"""One builder of a process's settings (big.config.build_service_config): layers, types and refusals by name."""
import pytest

from big.config import ConfigError, Limits, build_service_config


def test_the_environment_wins_over_the_file_and_a_command_line_over_both():
    env = {"BIG_ROLE": "serve", "BIG_SERVE_THREADS": "2", "BIG_WORKSPACE": "/store"}
    c = build_service_config({"role": "all", "serve_threads": 1, "workspace": "ws", "job_poll_s": 2}, env,
                             workspace="/mine", job_lease_s=None)
    assert (c.role, c.serve_threads, c.workspace, c.job_poll_s, c.job_lease_s) == ("serve", 2, "/mine", 2.0, 20.0)


def test_values_take_their_settings_types():
    c = build_service_config({"cache_max_bytes": 1.0e9, "job_lease_s": 8, "fuse_adapters": False,
                              "gradient_checkpointing": "true", "limits": {"max_images": 4.0}}, {})
    assert c.cache_max_bytes == 10**9 and isinstance(c.cache_max_bytes, int) and isinstance(c.job_lease_s, float)
    assert c.gradient_checkpointing is True and c.limits == Limits(max_images=4)
    assert build_service_config({"fuse_adapters": "false"}, {}).fuse_adapters is False  # as an environment gives it


@pytest.mark.parametrize("settings, message", [
    ({"job_pol_s": 1}, "unknown setting 'job_pol_s' (did you mean 'job_poll_s'?)"),
    ({"limits": {"max_imgs": 3}}, "unknown limit 'max_imgs' (did you mean 'max_images'?)"),
    ({"train_workers": 1.5}, "setting 'train_workers' must be a whole number, not 1.5"),
    ({"job_lease_s": True}, "setting 'job_lease_s' must be a number, not True"),
    ({"fuse_adapters": "sometimes"}, "setting 'fuse_adapters' must be true or false, not 'sometimes'"),
    ({"auth": "hs256"}, "setting 'auth' must be a mapping, not 'hs256'"),
    ({"limits": {"max_images": "many"}}, "setting 'limits.max_images' must be a whole number, not 'many'"),
    ({"role": "boss"}, "role must be one of all, serve, train, not 'boss'"),
    ({"batch_window_s": -1}, "batch_window_s must not be negative"),
])
def test_a_wrong_key_or_value_is_refused_by_name(settings, message):
    with pytest.raises(ConfigError) as e:
        build_service_config(settings, {})
    assert message in str(e.value)


def test_a_bad_environment_value_is_refused_by_its_setting():
    with pytest.raises(ConfigError, match="setting 'serve_threads' must be a whole number, not 'all'"):
        build_service_config({}, {"BIG_SERVE_THREADS": "all"})
