"""The scheduler: `_core.SwitchCore` decides (pure, explicit clock, effects as data);
`_switcher.Switcher` carries the decisions out against a backend and hands out leases."""
