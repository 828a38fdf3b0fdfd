// The public C++ API of ringcast: include this one header.
// Session (communicator, device, stream), DeviceBuffer, tensor views, errors and the logger; the
// attention operator and the model are added here as they land.
#pragma once

#include <ringcast/error.hpp>
#include <ringcast/log.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/session.hpp>
#include <ringcast/tensor.hpp>
#include <ringcast/version.hpp>
