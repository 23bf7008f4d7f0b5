'use strict';
// `@m6s/box`, the module Zeep's functions call others through: `invoke(name, arg)`
// is `sprout.call(name, arg)`. sprout provides it; it is never fetched.

const sprout = require('./sprout.js');

function invoke(name, arg) {
  return sprout.call(name, arg === undefined ? null : arg);
}

module.exports = { invoke };
