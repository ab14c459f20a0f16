#include <gtest/gtest.h>
TEST(Placeholdercache, Builds) {}
