-- A marker (docs/deploy.md, "Upgrading"; 0032): gateway_recover's cutoff by the
-- database's clock is moved back by the clocks' difference, no longer by the
-- age in whole days reckoned in the session's time zone, an hour off across a
-- change of daylight saving time (review-skew F6). Nothing else changes.
SELECT 1;
