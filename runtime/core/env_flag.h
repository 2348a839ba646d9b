// On/off switches read from the environment (LOOM_FUSED_ATTENTION,
// LOOM_KEEP_FREED_HOST_MEMORY, ...): one spelling of "on" and "off" for all.
//
// env_flag(name, default_value): unset or empty gives default_value;
// 1/on/true/yes and 0/off/false/no (any case) give true and false; anything
// else throws ConfigError naming the variable, its value and the allowed
// values (a typo must not silently keep the default). Who calls it: the code
// that owns the switch, once per process (cache the answer).
#pragma once

namespace loom {

bool env_flag(const char* name, bool default_value);

// The same, but a value env_flag refuses reads as default_value: for readers
// that must not throw (inside a collective); Job refuses the typo at start.
bool env_flag_nothrow(const char* name, bool default_value);

}  // namespace loom
