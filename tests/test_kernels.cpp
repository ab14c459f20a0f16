#include <gtest/gtest.h>
TEST(Placeholderkernels, Builds) {}
